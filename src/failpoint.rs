//! `failpoint!`: a named fail point for the crash tests (`--features failpoints`, configured
//! through `$FAILPOINTS` in the binary); without the feature it compiles to nothing. Used by the
//! relay and by the store's commit.

/// A fail point: `failpoint!("name")`, or `failpoint!("name", |arg| ...)` for a `return` action.
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name);
    };
    ($name:literal, $e:expr) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, $e);
    };
}
