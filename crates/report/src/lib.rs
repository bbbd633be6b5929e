//! # livemig-report
//!
//! Pictures of a migration report (placeholder: being written).
