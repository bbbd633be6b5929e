//! # livemig-qmp
