//! Why an object entry cannot be believed ([`EntryError`], with the values found) and the
//! heap-range rule ([`check_heap_range`]) the entry validator applies.

use crate::layout::{object_flags, Layout, MAX_NAME_BYTES, NAME_GRANULE};
use crate::name::NameError;
use crate::shm::Fault;

/// Why an object entry cannot be believed. The variants carry the values found, so a reader
/// can report the fault without looking at the entry again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryError {
    /// The access itself failed (slot out of range, region too small).
    Fault(Fault),
    /// The host kept the seqlock odd for longer than a reader waits.
    Busy,
    /// A state value this version does not define.
    BadState {
        /// The state found.
        state: u32,
    },
    /// A kind value this version does not define.
    BadKind {
        /// The kind found.
        kind: u32,
    },
    /// The memory range is not an aligned range inside the heap with `size <= max_size`.
    BadRange {
        /// Region offset of the object's memory.
        offset: u64,
        /// Current size.
        size: u64,
        /// Reserved size.
        max_size: u64,
        /// Which rule the range breaks.
        problem: RangeProblem,
    },
    /// Flag bits this version does not define.
    UnknownFlags {
        /// The flags found.
        flags: u32,
        /// The bits this version does not define for this kind.
        unknown: u32,
    },
    /// The NAMED flag and the name length disagree (named with length 0, or unnamed with a
    /// length).
    NamedMismatch {
        /// The flags found.
        flags: u32,
        /// The name length found.
        name_len: u32,
    },
    /// The name reference (`name_off`, `name_len`) does not name bytes inside the name area
    /// (version 4): checked before the bytes are read.
    BadNameRef {
        /// The offset found (from the start of the name area).
        name_off: u32,
        /// The name length found.
        name_len: u32,
        /// Which rule it breaks.
        problem: NameRefProblem,
    },
    /// The name breaks the name rules.
    BadName {
        /// The name length found.
        name_len: u32,
        /// The rule it breaks.
        error: NameError,
    },
    /// The stored hash is not the hash of the name bytes.
    BadNameHash {
        /// The name length found.
        name_len: u32,
        /// The hash stored in the entry.
        stored: u32,
        /// [`crate::name_hash`] of the name bytes.
        computed: u32,
    },
}

/// Which rule a name reference breaks (checked in this order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRefProblem {
    /// `name_len` is over [`MAX_NAME_BYTES`].
    TooLong,
    /// An unnamed entry (`name_len` 0) with a non-zero `name_off`.
    UnnamedWithOffset,
    /// `name_off` is not a multiple of [`NAME_GRANULE`].
    Misaligned,
    /// `name_off + name_len` is beyond the name area.
    OutsideArea {
        /// The name area's size.
        area_size: u64,
    },
}

/// Checks a name reference against the name area: the region offset of its bytes
/// (`None` for unnamed), or the first rule it breaks. Checked arithmetic throughout.
pub fn check_name_ref(
    layout: &Layout,
    name_off: u32,
    name_len: u16,
) -> Result<Option<u64>, NameRefProblem> {
    let len = usize::from(name_len);
    if len > MAX_NAME_BYTES {
        return Err(NameRefProblem::TooLong);
    }
    if len == 0 {
        return if name_off == 0 {
            Ok(None)
        } else {
            Err(NameRefProblem::UnnamedWithOffset)
        };
    }
    if u64::from(name_off) % NAME_GRANULE != 0 {
        return Err(NameRefProblem::Misaligned);
    }
    layout
        .name_bytes(name_off, u64::from(name_len))
        .map(Some)
        .ok_or(NameRefProblem::OutsideArea {
            area_size: layout.name_span(),
        })
}

/// Which rule an object's memory range breaks (checked in this order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeProblem {
    /// `max_size` is 0.
    ZeroMaxSize,
    /// `size > max_size`.
    SizeOverMax,
    /// The offset is not a multiple of the heap alignment.
    Misaligned {
        /// The region's allocation granularity.
        alignment: u64,
    },
    /// `offset + max_size` overflows a u64.
    Overflow,
    /// The range starts before the heap.
    BeforeHeap {
        /// Where the heap starts.
        heap_offset: u64,
    },
    /// The range ends beyond the region.
    BeyondHeap {
        /// Where the region (and heap) ends.
        region_end: u64,
    },
    /// An event or mutex claims memory (they have none: offset, size and max size are 0).
    NotMemoryless,
}

impl From<Fault> for EntryError {
    fn from(f: Fault) -> Self {
        EntryError::Fault(f)
    }
}

impl core::fmt::Display for EntryError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            EntryError::Fault(x) => write!(f, "{x}"),
            EntryError::Busy => write!(f, "entry kept changing while being read"),
            EntryError::BadState { state } => {
                write!(f, "state {state} is not FREE (0), LIVE (1) or UNLINKED (2)")
            }
            EntryError::BadKind { kind } => {
                write!(f, "kind {kind} is not SECTION (1), EVENT (2) or MUTEX (3)")
            }
            EntryError::BadRange {
                offset: o,
                size: s,
                max_size: m,
                problem,
            } => match problem {
                RangeProblem::ZeroMaxSize => write!(f, "max_size is 0"),
                RangeProblem::SizeOverMax => write!(f, "size {s} exceeds max_size {m}"),
                RangeProblem::Misaligned { alignment } => write!(
                    f,
                    "offset {o:#x} is not a multiple of the alignment {alignment}"
                ),
                RangeProblem::Overflow => write!(f, "offset {o:#x} + max_size {m} overflows"),
                RangeProblem::BeforeHeap { heap_offset } => write!(
                    f,
                    "range [{o:#x}, {:#x}) starts before the heap at {heap_offset:#x}",
                    o.wrapping_add(m)
                ),
                RangeProblem::BeyondHeap { region_end } => write!(
                    f,
                    "range [{o:#x}, {:#x}) ends beyond the heap (region end {region_end:#x})",
                    o.wrapping_add(m)
                ),
                RangeProblem::NotMemoryless => write!(
                    f,
                    "an event or mutex has no memory, but offset is {o:#x}, size {s}, max_size {m}"
                ),
            },
            EntryError::UnknownFlags { flags, unknown } => {
                write!(f, "flags {flags:#x} have unknown bits {unknown:#x}")
            }
            EntryError::NamedMismatch { flags, name_len } => write!(
                f,
                "NAMED is {} but name_len is {name_len}",
                if flags & object_flags::NAMED != 0 {
                    "set"
                } else {
                    "clear"
                }
            ),
            EntryError::BadNameRef {
                name_off,
                name_len,
                problem,
            } => match problem {
                NameRefProblem::TooLong => {
                    write!(f, "name_len {name_len} exceeds {MAX_NAME_BYTES} bytes")
                }
                NameRefProblem::UnnamedWithOffset => {
                    write!(f, "name_len is 0 but name_off is {name_off:#x}")
                }
                NameRefProblem::Misaligned => write!(
                    f,
                    "name_off {name_off:#x} is not a multiple of {NAME_GRANULE}"
                ),
                NameRefProblem::OutsideArea { area_size } => write!(
                    f,
                    "name [{name_off:#x}, +{name_len}) is outside the name area of {area_size} bytes"
                ),
            },
            EntryError::BadName { name_len, error } => {
                write!(f, "object name of {name_len} bytes is invalid: {error}")
            }
            EntryError::BadNameHash {
                name_len,
                stored,
                computed,
            } => write!(
                f,
                "name_hash {stored:#010x} is not the FNV-1a hash {computed:#010x} of the \
                 {name_len}-byte name"
            ),
        }
    }
}

/// Checks an object's memory range against the heap: the first rule it breaks, if any.
pub fn check_heap_range(
    layout: &Layout,
    offset: u64,
    size: u64,
    max_size: u64,
) -> Result<(), RangeProblem> {
    if max_size == 0 {
        return Err(RangeProblem::ZeroMaxSize);
    }
    if size > max_size {
        return Err(RangeProblem::SizeOverMax);
    }
    if offset % layout.alignment != 0 {
        return Err(RangeProblem::Misaligned {
            alignment: layout.alignment,
        });
    }
    let Some(end) = offset.checked_add(max_size) else {
        return Err(RangeProblem::Overflow);
    };
    if offset < layout.heap_offset {
        return Err(RangeProblem::BeforeHeap {
            heap_offset: layout.heap_offset,
        });
    }
    if end > layout.region_size {
        return Err(RangeProblem::BeyondHeap {
            region_end: layout.region_size,
        });
    }
    Ok(())
}

/// The range rule of an object of `kind`: a section's memory is a heap range
/// ([`check_heap_range`]); an event or mutex has none (offset, size and max size all 0).
pub fn check_object_range(
    layout: &Layout,
    kind: u32,
    offset: u64,
    size: u64,
    max_size: u64,
) -> Result<(), RangeProblem> {
    if kind == crate::layout::kind::SECTION {
        check_heap_range(layout, offset, size, max_size)
    } else if offset == 0 && size == 0 && max_size == 0 {
        Ok(())
    } else {
        Err(RangeProblem::NotMemoryless)
    }
}
