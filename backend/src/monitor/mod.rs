//! vshmctl's views: the live terminal view (`top`) and the offline region decoder
//! (`inspect`).
pub mod inspect;
pub mod text;
pub mod top;
