//! What a test asks for: which connection and direction, when, and what goes wrong; and the
//! record of what the proxy did fire.

/// A direction of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    /// From the client that connected to the proxy to the target.
    Up,
    /// From the target back to the client.
    Down,
}

impl Dir {
    pub(crate) fn idx(self) -> usize {
        match self {
            Dir::Up => 0,
            Dir::Down => 1,
        }
    }
    pub(crate) fn other(self) -> Dir {
        match self {
            Dir::Up => Dir::Down,
            Dir::Down => Dir::Up,
        }
    }
    pub(crate) fn name(self) -> &'static str {
        match self {
            Dir::Up => "up",
            Dir::Down => "down",
        }
    }
}

/// Which connections a rule applies to, by accept order (0 is the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// Only the connection accepted `n`th (0 is the first).
    Nth(usize),
    /// Every connection.
    Every,
}

impl Which {
    pub(crate) fn matches(self, conn: usize) -> bool {
        match self {
            Which::Nth(n) => n == conn,
            Which::Every => true,
        }
    }
}

/// When a rule fires, counted in the bytes of its direction on its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// After exactly this many bytes have gone through (for [`Fault::Flip`]: at the byte
    /// with this offset).
    AfterBytes(u64),
    /// Right after the first occurrence of this byte string (for [`Fault::Flip`]: at the
    /// byte that follows it).
    AfterPattern(Vec<u8>),
}

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Both peers get an RST (the bytes before the trigger are delivered first).
    Reset,
    /// Both peers get a FIN: the stream ends wherever the trigger falls.
    Cut,
    /// The byte at the trigger is XORed with this mask; everything else passes.
    Flip(u8),
    /// Nothing more is forwarded, either way, and nothing is closed.
    Hang,
}

/// One fault to inject.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The connections it applies to.
    pub conn: Which,
    /// The direction whose bytes it counts (and, for a flip, changes).
    pub dir: Dir,
    /// When it fires.
    pub trigger: Trigger,
    /// What goes wrong then.
    pub fault: Fault,
}

impl Rule {
    /// `fault` on the connections `conn`, when `trigger` is reached in `dir`.
    pub fn new(conn: Which, dir: Dir, trigger: Trigger, fault: Fault) -> Rule {
        Rule {
            conn,
            dir,
            trigger,
            fault,
        }
    }
    /// RST both peers after `bytes` bytes in `dir`.
    pub fn reset_after(conn: Which, dir: Dir, bytes: u64) -> Rule {
        Rule::new(conn, dir, Trigger::AfterBytes(bytes), Fault::Reset)
    }
    /// FIN both peers after `bytes` bytes in `dir`.
    pub fn cut_after(conn: Which, dir: Dir, bytes: u64) -> Rule {
        Rule::new(conn, dir, Trigger::AfterBytes(bytes), Fault::Cut)
    }
    /// XOR the byte at `offset` in `dir` with `mask`.
    pub fn flip_at(conn: Which, dir: Dir, offset: u64, mask: u8) -> Rule {
        Rule::new(conn, dir, Trigger::AfterBytes(offset), Fault::Flip(mask))
    }
    /// Stop forwarding after `bytes` bytes in `dir`.
    pub fn hang_after(conn: Which, dir: Dir, bytes: u64) -> Rule {
        Rule::new(conn, dir, Trigger::AfterBytes(bytes), Fault::Hang)
    }
    /// `fault` right after `pattern` has gone through in `dir`.
    pub fn after_pattern(conn: Which, dir: Dir, pattern: &[u8], fault: Fault) -> Rule {
        Rule::new(conn, dir, Trigger::AfterPattern(pattern.to_vec()), fault)
    }
}

/// A fault the proxy fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    /// The connection, by accept order.
    pub conn: usize,
    /// The direction whose rule fired; `None` for a fault fired by [`Proxy::fault`] or one
    /// that mirrors a peer's reset.
    pub dir: Option<Dir>,
    /// The offset in that direction (for `None`: bytes forwarded up so far).
    pub at: u64,
    /// What went wrong.
    pub fault: Fault,
}
