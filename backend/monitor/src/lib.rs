//! vshmctl's views of a running vshmd, and of a region when vshmd cannot be asked: plain text
//! from the control socket's JSON documents (`text`), the live terminal view (`top`), and the
//! offline region decoder (`inspect`), and the format-version check (`version`). Depends on the format and the control protocol only,
//! never on vshmd itself.
#![warn(missing_docs)]

pub mod inspect;
pub mod text;
pub mod top;
pub mod version;
