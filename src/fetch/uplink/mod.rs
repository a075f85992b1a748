//! The uplink budget (SPEC 4, "Uplink budget"): one token bucket for every byte this node reads from
//! upstream (misses, revalidations, prefetch, a child's requests), taken where the bytes are read from
//! the upstream body (`Metered`), so that a transfer held back stops reading its socket and TCP's own
//! flow control slows the sender; nothing is buffered beyond what hyper and the kernel hold.
//!
//! Two classes. Foreground (a client is waiting) takes from the bucket at once. Background (prefetch
//! jobs, background revalidation) takes from its own bucket (`background_rate`) and then from the common
//! one, but only while no foreground transfer has had to wait in the last `YIELD_FOR`: it gets what
//! foreground leaves. A transfer's class lives in a `Priority` that a client joining a prefetch's fill
//! raises to foreground. Background work runs only inside `uplink.windows`: a prefetch job asks
//! `Uplink::open` before each file, and a background body whose window closes is held after its
//! current frame until the next one opens. With no cap and no windows, a take is two counter additions.

mod bucket;
pub mod gather;
mod meter;
mod metered;
mod schedule;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use bucket::Bucket;
pub use metered::Metered;
pub use schedule::Schedule;

/// Background work stands back while a foreground transfer has waited for the bucket this recently.
const YIELD_FOR: Duration = Duration::from_millis(100);
/// How often background work held by a closed window looks at the clock again.
const WINDOW_LOOK: Duration = Duration::from_millis(250);
/// How often background work standing back looks again.
const LOOK_AGAIN: Duration = Duration::from_millis(20);

/// The kernel receive buffer (and hyper's read buffer) of upstream connections when the uplink is
/// capped at start: a sixty-fourth of a second's rate (64 KiB to 1 MiB). Unbounded, Linux grows it to megabytes while the first bytes
/// are read at full speed, and the sender fills it: an overshoot of the cap that takes seconds to
/// drain. Caps set later at run time apply to connections as they are (autotuned when none was set).
pub fn recv_buffer(cfg: &crate::config::Uplink) -> Option<usize> {
    // Only the common cap: with background_rate alone, clients' transfers run uncapped and keep
    // their autotuned buffers.
    let rate = cfg.max_rate.0;
    if rate == 0 {
        return None;
    }
    Some((rate / 64).clamp(64 << 10, 1 << 20) as usize)
}

/// Who is waiting for a transfer's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// A client (a device, a child gateway) is waiting.
    Foreground,
    /// Prefetch jobs, background revalidation.
    Background,
}

/// A transfer's class, shared by its body and by whoever may raise it to foreground.
#[derive(Clone, Debug)]
pub struct Priority(Arc<Standing>);

#[derive(Debug)]
struct Standing {
    background: AtomicBool,
    /// Background work held outside `uplink.windows` (a prefetch job with `window: false` is not).
    windowed: bool,
}

impl Priority {
    fn of(background: bool, windowed: bool) -> Priority {
        Priority(Arc::new(Standing {
            background: AtomicBool::new(background),
            windowed,
        }))
    }

    /// A client waits. Should every client leave, the transfer goes on as background work that the
    /// windows do not hold (a client's fill is not staging).
    pub fn foreground() -> Priority {
        Priority::of(false, false)
    }

    /// Background work that runs only inside the windows.
    pub fn background() -> Priority {
        Priority::of(true, true)
    }

    /// Background work that may run outside the windows too.
    pub fn background_anytime() -> Priority {
        Priority::of(true, false)
    }

    pub fn class(&self) -> Class {
        match self.0.background.load(Ordering::Relaxed) {
            true => Class::Background,
            false => Class::Foreground,
        }
    }

    /// Background work that the windows hold back (while they are closed).
    pub fn windowed(&self) -> bool {
        self.0.windowed && self.class() == Class::Background
    }

    /// A client is waiting for this transfer now.
    pub fn raise(&self) {
        self.0.background.store(false, Ordering::Relaxed);
    }

    /// No client waits for this transfer any more (it goes on to store the object): it takes what
    /// clients' transfers leave.
    pub fn lower(&self) {
        self.0.background.store(true, Ordering::Relaxed);
    }

    /// The priority of the task this runs in: background inside `in_background`, else foreground.
    pub fn current() -> Priority {
        PRIORITY
            .try_with(Priority::clone)
            .unwrap_or_else(|_| Priority::foreground())
    }

    /// A new priority of the current task's class, for a transfer that task starts (so that raising
    /// the transfer does not raise the task's other transfers).
    pub fn for_new_transfer() -> Priority {
        let now = Priority::current();
        Priority::of(now.class() == Class::Background, now.0.windowed)
    }

    /// Runs `f` (which starts transfers but does not wait for them) with this priority.
    pub fn sync_scope<R>(self, f: impl FnOnce() -> R) -> R {
        PRIORITY.sync_scope(self, f)
    }

    /// Runs `f` with this priority: the upstream bodies it opens are metered as this class.
    pub async fn scope<F: Future>(self, f: F) -> F::Output {
        PRIORITY.scope(self, f).await
    }
}

tokio::task_local! {
    static PRIORITY: Priority;
}

/// Where the budget reads the wall clock (the windows); a test moves it.
type WallClock = Arc<dyn Fn() -> jiff::Timestamp + Send + Sync>;

/// The caps in force; replaced whole by `PUT /v1/admin/uplink`.
struct Caps {
    max_rate: u64,
    background_rate: u64,
    all: Option<Arc<Bucket>>,
    background: Option<Arc<Bucket>>,
}

impl Caps {
    fn new(max_rate: u64, background_rate: u64) -> Caps {
        Caps {
            max_rate,
            background_rate,
            all: Bucket::new(max_rate).map(Arc::new),
            background: Bucket::new(background_rate).map(Arc::new),
        }
    }

    fn off(&self) -> bool {
        self.all.is_none() && self.background.is_none()
    }
}

pub struct Uplink {
    caps: RwLock<Caps>,
    /// A cap is set (a copy of `!caps.off()`, read without the lock on every body frame).
    capped: AtomicBool,
    /// When a foreground take last had to wait, in ms since `started`.
    foreground_waited: AtomicU64,
    started: Instant,
    /// Bytes read from upstream, foreground and background.
    bytes: [AtomicU64; 2],
    meters: [meter::Meter; 2],
    schedule: Schedule,
    /// `uplink.windows` as configured, for the status.
    windows: Vec<String>,
    clock: WallClock,
}

/// `GET /v1/uplink`.
#[derive(Serialize, Debug)]
pub struct UplinkStatus {
    pub max_rate: u64,
    pub background_rate: u64,
    /// Bytes per second over the last second.
    pub rate: ClassFigures,
    pub bytes: ClassFigures,
    pub windows: Vec<String>,
    pub timezone: String,
    /// Background work may run now.
    pub window_open: bool,
    /// When the windows next open (RFC 3339), when they are closed now.
    pub next_window: Option<String>,
    /// When the open window closes (RFC 3339).
    pub window_closes: Option<String>,
}

#[derive(Serialize, Debug, Default, Clone, Copy)]
pub struct ClassFigures {
    pub foreground: u64,
    pub background: u64,
}

impl Uplink {
    pub fn new(cfg: &crate::config::Uplink) -> Uplink {
        let clock: Option<WallClock> = cfg.clock.0.clone();
        let caps = Caps::new(cfg.max_rate.0, cfg.background_rate.0);
        Uplink {
            capped: AtomicBool::new(!caps.off()),
            caps: RwLock::new(caps),
            foreground_waited: AtomicU64::new(0),
            started: Instant::now(),
            bytes: Default::default(),
            meters: Default::default(),
            schedule: Schedule::new(cfg.parsed_windows(), &cfg.timezone),
            windows: cfg.windows.clone(),
            clock: clock.unwrap_or_else(|| Arc::new(jiff::Timestamp::now)),
        }
    }

    /// Counts `n` bytes of `class`; true when nothing has to be waited for (no cap set).
    pub fn count(&self, class: Class, n: u64) -> bool {
        let i = class as usize;
        self.bytes[i].fetch_add(n, Ordering::Relaxed);
        self.meters[i].add(n);
        !self.capped.load(Ordering::Relaxed)
    }

    /// Whether a cap is set (bytes may have to wait).
    pub fn is_capped(&self) -> bool {
        self.capped.load(Ordering::Relaxed)
    }

    /// Waits until `n` bytes of `class` (counted already) may pass.
    pub async fn wait(&self, class: Class, n: u64) {
        let (all, background) = {
            let c = self.caps.read().unwrap_or_else(|p| p.into_inner());
            (c.all.clone(), c.background.clone())
        };
        if class == Class::Background {
            if let Some(b) = background {
                b.take(n).await;
            }
            while all.is_some() && self.foreground_busy() {
                tokio::time::sleep(LOOK_AGAIN).await;
            }
        }
        if let Some(all) = all {
            let asked = Instant::now();
            all.take(n).await;
            if class == Class::Foreground && asked.elapsed() >= Duration::from_millis(1) {
                let ms = self.started.elapsed().as_millis() as u64;
                self.foreground_waited.store(ms, Ordering::Relaxed);
            }
        }
    }

    fn foreground_busy(&self) -> bool {
        let last = self.foreground_waited.load(Ordering::Relaxed);
        let now = self.started.elapsed().as_millis() as u64;
        last > 0 && now.saturating_sub(last) < YIELD_FOR.as_millis() as u64
    }

    /// Changes the caps (run time, not persisted); None leaves one as it is.
    pub fn set_caps(&self, max_rate: Option<u64>, background_rate: Option<u64>) {
        let mut c = self.caps.write().unwrap_or_else(|p| p.into_inner());
        let caps = Caps::new(
            max_rate.unwrap_or(c.max_rate),
            background_rate.unwrap_or(c.background_rate),
        );
        self.capped.store(!caps.off(), Ordering::Relaxed);
        *c = caps;
    }

    /// The wall clock the windows are read at.
    pub fn now(&self) -> jiff::Timestamp {
        (self.clock)()
    }

    /// Whether background work may use the uplink now (inside a window, or no windows set).
    pub fn open(&self) -> bool {
        self.windows.is_empty() || self.schedule.open_at((self.clock)())
    }

    /// Waits while the windows hold `priority`'s work back (until one opens, or a client raises it).
    pub async fn until_let_through(&self, priority: &Priority) {
        while priority.windowed() && !self.open() {
            tokio::time::sleep(WINDOW_LOOK).await;
        }
    }

    /// How long until the windows next open (None: open now, or never within a week).
    pub fn until_open(&self) -> Option<Duration> {
        let now = (self.clock)();
        if self.schedule.open_at(now) {
            return None;
        }
        let at = self.schedule.next_change(now, true)?;
        Some(now.duration_until(at).unsigned_abs())
    }

    /// The common cap in force (`uplink.max_rate`, or as `PUT /v1/admin/uplink` set it); 0: none.
    pub fn max_rate(&self) -> u64 {
        self.caps.read().unwrap_or_else(|p| p.into_inner()).max_rate
    }

    /// Bytes read from upstream by `class` since start.
    pub fn bytes(&self, class: Class) -> u64 {
        self.bytes[class as usize].load(Ordering::Relaxed)
    }

    /// What `GET /v1/uplink` shows.
    pub fn status(&self) -> UplinkStatus {
        let c = self.caps.read().unwrap_or_else(|p| p.into_inner());
        let now = (self.clock)();
        let open = self.schedule.open_at(now);
        let change = self.schedule.next_change(now, !open);
        let figures = |f: &dyn Fn(usize) -> u64| ClassFigures {
            foreground: f(0),
            background: f(1),
        };
        UplinkStatus {
            max_rate: c.max_rate,
            background_rate: c.background_rate,
            rate: figures(&|i| self.meters[i].rate()),
            bytes: figures(&|i| self.bytes[i].load(Ordering::Relaxed)),
            windows: self.windows.clone(),
            timezone: self.schedule.zone.clone(),
            window_open: open,
            next_window: change.filter(|_| !open).map(|t| t.to_string()),
            window_closes: change.filter(|_| open).map(|t| t.to_string()),
        }
    }
}

impl std::fmt::Debug for Uplink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uplink")
            .field("capped", &self.capped.load(Ordering::Relaxed))
            .finish()
    }
}
