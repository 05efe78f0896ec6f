//! The public WatchSandboxes stream: the matching rows, `synced`, then
//! changes.
//!
//! A watch is pulled, not pushed: it does work only when its client's
//! stream has room for more (the HTTP/2 window), so a client that stops
//! reading costs one page of buffered events in the watch at most, however
//! much changes. (Below it, the HTTP/2 layer holds what the client's window
//! allows but its socket does not take, up to the per-stream send buffer
//! the API server sets: [`crate::api::http2::STREAM_SEND_BUFFER`].) It
//! reads changes from the store's [`Feed`](crate::state::store::Feed)
//! (every committed change, in commit order, shared by every watch) at its
//! own position; a watch that fell behind the feed catches up from the
//! database: the current rows changed, and the tombstones of rows deleted,
//! since the last change it sent. Nothing is buffered per watch beyond one
//! page, and database reads for watches use connections of their own,
//! [`WATCH_READERS`] at a time, so watches never hold up requests.
//!
//! Changes reach a watch in the order they were committed, so a stale
//! version of a sandbox is never sent after a newer one. When a driver's
//! availability changes, its sandboxes are sent again with their new
//! condition. Platform events are forwarded to watches that keep up; one
//! that falls behind the gateway's event bus misses them.
//!
//! Watches are woken in batches: a change committed by a request wakes one
//! pacer task, not every watch, so a create's reply never waits on the
//! fan-out; the pacer waits `watch_coalesce_ms` (default
//! [`DEFAULT_WATCH_COALESCE`]) for more changes, then wakes every watch once
//! for all of them. A watch therefore hears of a change up to that long
//! after its commit, and a burst of changes costs each watch one wake-up
//! (and its connection one write) instead of one per change. 0 wakes the
//! watches as soon as the pacer runs.
//!
//! A change from the feed is translated and encoded once, by the first
//! watch that sends it, and the bytes are shared by every other watch that
//! sends it with the same driver availability condition
//! ([`WatchItem::Encoded`], sent as they are by the API's watch codec):
//! 1000 watches cost one encoding per change, not 1000. Listings and
//! catch-up pages are encoded per watch.
//!
//! At most `max_watches` watches are open at once; one more is refused
//! with `RESOURCE_EXHAUSTED`.
//!
//! What closed watches freed is given back to the system
//! ([`crate::memory::release_free_heap`]) [`RELEASE_DELAY`] after a watch
//! closes (the rest of a burst closes meanwhile), at most once per
//! [`RELEASE_INTERVAL`]: glibc would otherwise keep it.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use openshell_driver_kit::contract::truncate;
use openshell_proto::gateway::v1::{self as gw, watch_sandboxes_event::Payload};
use openshell_wire::limits::ECHO_BYTES;
use prost::Message as _;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::{BusEvent, Gateway};
use crate::api::{translate, validate};
use crate::error::{Error, Result};
use crate::state::store::{Change, FeedEntry, ListQuery, SandboxRow, Since, Store, WATCH_READERS};

/// Watches open at once unless configured otherwise (`--max-watches`,
/// `max_watches`).
pub const DEFAULT_MAX_WATCHES: usize = 1024;

/// How long the pacer gathers changes before waking the watches, unless
/// configured otherwise (`--watch-coalesce-ms`, `watch_coalesce_ms`).
pub const DEFAULT_WATCH_COALESCE: Duration = Duration::from_millis(5);

/// Rows per database read of a watch...
const PAGE_ROWS: usize = 16;
/// ...and about how many bytes of them: what a watch buffers at most
/// (besides one sandbox larger than that).
const PAGE_BYTES: usize = 16 * 1024;
/// Bus events a watch takes in one go.
const BUS_BATCH: usize = 256;
/// How long after a watch closes freed memory is given back...
pub const RELEASE_DELAY: Duration = Duration::from_secs(1);
/// ...and how often at most.
pub const RELEASE_INTERVAL: Duration = Duration::from_secs(10);

/// One event of a public watch: a message of its own, or a change from the
/// feed encoded once and shared by every watch that sends it.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchItem {
    Event(Box<gw::WatchSandboxesEvent>),
    /// An encoded `WatchSandboxesEvent`.
    Encoded(Arc<[u8]>),
}

impl WatchItem {
    /// The event as a message (decoding a shared encoding).
    pub fn into_event(self) -> std::result::Result<gw::WatchSandboxesEvent, Status> {
        match self {
            Self::Event(event) => Ok(*event),
            Self::Encoded(bytes) => gw::WatchSandboxesEvent::decode(&bytes[..])
                .map_err(|e| Status::internal(format!("a shared watch event: {e}"))),
        }
    }
}

/// The stream a public watch returns.
pub type WatchStream = Pin<Box<dyn Stream<Item = std::result::Result<WatchItem, Status>> + Send>>;

/// How many watches may be open, how many database reads they may make at
/// once, and how they are woken.
#[derive(Debug)]
pub struct WatchLimits {
    max: usize,
    slots: Arc<Semaphore>,
    reads: Arc<Semaphore>,
    /// How long the pacer gathers changes before waking the watches.
    coalesce: Duration,
    /// The feed's head as the pacer last passed it on: what watches wait on.
    paced: Arc<watch::Sender<u64>>,
    /// Whether the pacer was started (on the first watch).
    pacing: AtomicBool,
    /// Told when a watch closes: wakes the task giving freed memory back.
    closed: Arc<Notify>,
}

impl WatchLimits {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            slots: Arc::new(Semaphore::new(max)),
            reads: Arc::new(Semaphore::new(WATCH_READERS)),
            coalesce: DEFAULT_WATCH_COALESCE,
            paced: Arc::new(watch::Sender::new(0)),
            pacing: AtomicBool::new(false),
            closed: Arc::new(Notify::new()),
        }
    }

    /// Watches open now.
    pub fn open(&self) -> usize {
        self.max - self.slots.available_permits()
    }
}

impl Default for WatchLimits {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_WATCHES)
    }
}

impl Gateway {
    /// This gateway with at most `max` watches open at once.
    #[must_use]
    pub fn with_max_watches(mut self, max: usize) -> Self {
        self.watches.max = max;
        self.watches.slots = Arc::new(Semaphore::new(max));
        self
    }

    /// This gateway waking its watches at most once per `every` (0: as
    /// soon as a change is committed).
    #[must_use]
    pub fn with_watch_coalesce(mut self, every: Duration) -> Self {
        self.watches.coalesce = every;
        self
    }

    /// Starts the pacer and the memory releaser, once: from the first
    /// watch, so that they run on the runtime serving the watches.
    fn start_watch_tasks(&self) {
        if self.watches.pacing.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(pace(
            self.store.feed().subscribe(),
            Arc::clone(&self.watches.paced),
            self.watches.coalesce,
            self.shutdown.clone(),
        ));
        tokio::spawn(release_after_closes(
            Arc::clone(&self.watches.closed),
            RELEASE_DELAY,
            RELEASE_INTERVAL,
            self.shutdown.clone(),
            || {
                let released = crate::memory::release_free_heap();
                tracing::debug!(released, "gave freed memory back after watches closed");
            },
        ));
    }

    /// Starts a public watch: the matching sandboxes, `synced`, then changes.
    pub async fn watch(
        self: &Arc<Self>,
        request: gw::WatchSandboxesRequest,
    ) -> std::result::Result<WatchStream, Status> {
        self.ensure_running()?;
        if !request.name.is_empty() {
            validate::sandbox_name(&request.name).map_err(Error::InvalidArgument)?;
        }
        let driver = if request.driver.is_empty() {
            None
        } else {
            validate::driver_name(&request.driver).map_err(Error::InvalidArgument)?;
            let driver = request.driver.to_ascii_lowercase();
            if !self.registry.is_configured(&driver) {
                let probe = driver.clone();
                if !self.db(move |s| s.has_driver(&probe)).await? {
                    return Err(Error::NotFound(format!(
                        "driver '{}' is not configured and has no sandboxes; configured drivers: {}",
                        truncate(&driver, ECHO_BYTES),
                        self.registry.names()
                    ))
                    .into());
                }
            }
            Some(driver)
        };
        let permit = Arc::clone(&self.watches.slots)
            .try_acquire_owned()
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "the gateway already serves {} watches, its limit (--max-watches, or \
                     max_watches in [openshell.gateway]); close a watch or raise the limit",
                    self.watches.max
                ))
            })?;
        let slot = Slot {
            _permit: permit,
            closed: Arc::clone(&self.watches.closed),
        };
        self.start_watch_tasks();
        let name = (!request.name.is_empty()).then_some(request.name);
        let watch = PublicWatch::new(Arc::clone(self), driver, name, slot);
        let events = futures::stream::unfold(watch, |mut watch| async move {
            watch.next().await.map(|event| (event, watch))
        });
        Ok(Box::pin(
            events.take_until(self.shutdown.clone().cancelled_owned()),
        ))
    }
}

/// Passes the feed's head on to `paced` once per burst of changes: wakes
/// on a change, waits `every` for more, then wakes every watch once. Ends
/// at shutdown or when the feed is gone.
async fn pace(
    mut feed: watch::Receiver<u64>,
    paced: Arc<watch::Sender<u64>>,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = feed.changed() => if changed.is_err() { return },
        }
        if !every.is_zero() {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
        // Marks every change up to here seen: one pushed after this wakes
        // the next round.
        let head = *feed.borrow_and_update();
        paced.send_replace(head);
    }
}

/// Gives freed memory back (`release`, on a blocking thread) `delay`
/// after `closed` is told a watch closed, then waits out the rest of
/// `interval` before the next time. Ends at shutdown.
async fn release_after_closes(
    closed: Arc<Notify>,
    delay: Duration,
    interval: Duration,
    stop: CancellationToken,
    release: impl Fn() + Clone + Send + 'static,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = closed.notified() => {}
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        let release = release.clone();
        if let Err(error) = tokio::task::spawn_blocking(release).await {
            tracing::warn!(%error, "giving freed memory back failed");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval.saturating_sub(delay)) => {}
        }
    }
}

/// A watch's place among the `max_watches`; giving it back wakes the
/// memory releaser.
struct Slot {
    _permit: OwnedSemaphorePermit,
    closed: Arc<Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.closed.notify_one();
    }
}

/// A name-ordered listing still to send: the initial one, or a driver's
/// sandboxes after its availability changed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listing {
    driver: Option<String>,
    after: Option<String>,
}

/// One public WatchSandboxes stream.
struct PublicWatch {
    gateway: Arc<Gateway>,
    driver: Option<String>,
    name: Option<String>,
    /// Every wanted change numbered up to here has been sent.
    cursor: u64,
    /// Rows a listing sent that were numbered past the cursor: their
    /// changes up to that number are not news. Only filled while a listing
    /// runs ahead of the feed; emptied once the cursor passes them.
    ahead: HashMap<String, u64>,
    ahead_max: u64,
    /// Events ready to go: at most about one page.
    pending: VecDeque<WatchItem>,
    listings: VecDeque<Listing>,
    synced: bool,
    /// Behind the feed: catch up from the database.
    lagged: bool,
    /// The driver availability condition each driver's sandboxes were last
    /// sent with.
    conditions: HashMap<String, Option<gw::Condition>>,
    feed: watch::Receiver<u64>,
    bus: broadcast::Receiver<BusEvent>,
    done: bool,
    _slot: Slot,
}

fn event(payload: Payload) -> WatchItem {
    WatchItem::Event(Box::new(gw::WatchSandboxesEvent {
        payload: Some(payload),
    }))
}

impl PublicWatch {
    fn new(
        gateway: Arc<Gateway>,
        driver: Option<String>,
        name: Option<String>,
        slot: Slot,
    ) -> Self {
        // Subscribe before reading anything, so nothing falls between.
        let bus = gateway.subscribe();
        let feed = gateway.watches.paced.subscribe();
        let cursor = gateway.store.feed().head();
        Self {
            driver,
            name,
            cursor,
            ahead: HashMap::new(),
            ahead_max: 0,
            pending: VecDeque::new(),
            listings: VecDeque::from([Listing {
                driver: None,
                after: None,
            }]),
            synced: false,
            lagged: false,
            conditions: HashMap::new(),
            feed,
            bus,
            done: false,
            _slot: slot,
            gateway,
        }
    }

    fn wants(&self, driver: &str, name: &str) -> bool {
        self.driver.as_deref().is_none_or(|d| d == driver)
            && self.name.as_deref().is_none_or(|n| n == name)
    }

    /// The next event; `None` ends the stream.
    async fn next(&mut self) -> Option<std::result::Result<WatchItem, Status>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            match self.step().await {
                Ok(true) => {}
                Ok(false) => self.wait().await,
                Err(status) => {
                    self.done = true;
                    return Some(Err(status));
                }
            }
        }
    }

    /// Does one piece of work; false when there is none until something
    /// changes.
    async fn step(&mut self) -> std::result::Result<bool, Status> {
        if !self.listings.is_empty() {
            self.list_page().await?;
            return Ok(true);
        }
        if !self.synced {
            self.synced = true;
            self.pending
                .push_back(event(Payload::Synced(gw::WatchSynced {})));
            return Ok(true);
        }
        self.take_bus_events();
        if !self.pending.is_empty() || !self.listings.is_empty() {
            return Ok(true);
        }
        if self.lagged {
            self.catch_up_page().await?;
            return Ok(true);
        }
        // Mark the feed seen before reading it, so a change pushed after
        // this read wakes the wait (the pacer passes it on after the push).
        self.feed.borrow_and_update();
        match self
            .gateway
            .store
            .feed()
            .since(self.cursor, PAGE_ROWS, PAGE_BYTES)
        {
            Since::Lagged => {
                tracing::debug!(
                    cursor = self.cursor,
                    "a watcher fell behind the change feed; catching up from the database"
                );
                self.lagged = true;
                Ok(true)
            }
            Since::Entries(entries) if entries.is_empty() => Ok(false),
            Since::Entries(entries) => {
                for entry in entries {
                    self.emit_shared(&entry);
                    self.advance(entry.seq);
                }
                Ok(true)
            }
        }
    }

    /// Waits for a change, a bus event, or the end.
    async fn wait(&mut self) {
        let stop = self.gateway.shutdown.clone();
        tokio::select! {
            () = stop.cancelled() => self.done = true,
            changed = self.feed.changed() => {
                if changed.is_err() {
                    self.done = true;
                }
            }
            received = self.bus.recv() => self.bus_event(received),
        }
    }

    fn take_bus_events(&mut self) {
        for _ in 0..BUS_BATCH {
            match self.bus.try_recv() {
                Ok(event) => self.bus_event(Ok(event)),
                Err(broadcast::error::TryRecvError::Empty) => return,
                Err(broadcast::error::TryRecvError::Lagged(missed)) => {
                    self.bus_event(Err(broadcast::error::RecvError::Lagged(missed)));
                }
                Err(broadcast::error::TryRecvError::Closed) => {
                    self.bus_event(Err(broadcast::error::RecvError::Closed));
                    return;
                }
            }
        }
    }

    fn bus_event(&mut self, received: std::result::Result<BusEvent, broadcast::error::RecvError>) {
        match received {
            // Row changes come from the store's feed, in commit order.
            Ok(BusEvent::Changed(_) | BusEvent::Deleted { .. }) => {}
            Ok(BusEvent::Platform {
                driver,
                event: platform,
            }) => {
                if self.wants(&driver, &platform.sandbox_name) {
                    self.pending
                        .push_back(event(Payload::PlatformEvent(platform)));
                }
            }
            Ok(BusEvent::DriverState { driver }) => self.relist(driver),
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Availability changes may be among what was missed: send
                // again the sandboxes of every driver whose condition is
                // not the one they were last sent with.
                let stale: Vec<String> = self
                    .conditions
                    .iter()
                    .filter(|(driver, sent)| self.gateway.registry.condition_for(driver) != **sent)
                    .map(|(driver, _)| driver.clone())
                    .collect();
                for driver in stale {
                    self.relist(driver);
                }
            }
            Err(broadcast::error::RecvError::Closed) => self.done = true,
        }
    }

    /// Queues a listing of `driver`'s sandboxes, once.
    fn relist(&mut self, driver: String) {
        if self.driver.as_deref().is_some_and(|d| d != driver) {
            return;
        }
        // A listing of these sandboxes that has not sent anything yet will
        // send them as they are now anyway.
        let queued = self
            .listings
            .iter()
            .any(|l| l.after.is_none() && l.driver.as_ref().is_none_or(|d| *d == driver));
        if !queued {
            self.listings.push_back(Listing {
                driver: Some(driver),
                after: None,
            });
        }
    }

    /// The availability condition of `driver`'s sandboxes now, noted as
    /// the one sent.
    fn condition(&mut self, driver: &str) -> Option<gw::Condition> {
        let condition = self.gateway.registry.condition_for(driver);
        if self.conditions.get(driver) != Some(&condition) {
            self.conditions.insert(driver.to_owned(), condition.clone());
        }
        condition
    }

    /// The public view of a row, noting the availability condition sent.
    fn view(&mut self, row: &SandboxRow) -> gw::Sandbox {
        let condition = self.condition(&row.driver);
        translate::public_sandbox(row, condition)
    }

    /// Queues what a change from the feed means to this watch's client,
    /// as the encoding every watch shares: made by the first watch that
    /// sends it, again only by a watch that sees another availability
    /// condition for its driver than the one it was made with.
    fn emit_shared(&mut self, entry: &FeedEntry) {
        let FeedEntry {
            seq,
            change,
            encoded,
        } = entry;
        if !self.wants(change.driver(), change.name()) {
            return;
        }
        let (payload, condition) = match &**change {
            Change::Upsert(row) => {
                if self.ahead.get(&row.id).is_some_and(|sent| sent >= seq) {
                    return;
                }
                let condition = self.condition(&row.driver);
                if let Some((made_with, bytes)) = encoded.get()
                    && *made_with == condition
                {
                    self.pending
                        .push_back(WatchItem::Encoded(Arc::clone(bytes)));
                    return;
                }
                (
                    Payload::Sandbox(translate::public_sandbox(row, condition.clone())),
                    condition,
                )
            }
            Change::Deleted { id, name, .. } => {
                self.ahead.remove(id);
                if let Some((_, bytes)) = encoded.get() {
                    self.pending
                        .push_back(WatchItem::Encoded(Arc::clone(bytes)));
                    return;
                }
                (
                    Payload::Deleted(gw::SandboxDeleted {
                        id: id.clone(),
                        name: name.clone(),
                    }),
                    None,
                )
            }
        };
        let bytes: Arc<[u8]> = gw::WatchSandboxesEvent {
            payload: Some(payload),
        }
        .encode_to_vec()
        .into();
        // Another watch may have made it meanwhile: either is right.
        let _ = encoded.set((condition, Arc::clone(&bytes)));
        self.pending.push_back(WatchItem::Encoded(bytes));
    }

    /// Queues what a change means to this watch's client.
    fn emit(&mut self, seq: u64, change: &Change) {
        if !self.wants(change.driver(), change.name()) {
            return;
        }
        match change {
            Change::Upsert(row) => {
                if self.ahead.get(&row.id).is_some_and(|sent| *sent >= seq) {
                    return;
                }
                let sandbox = self.view(row);
                self.pending.push_back(event(Payload::Sandbox(sandbox)));
            }
            Change::Deleted { id, name, .. } => {
                self.ahead.remove(id);
                self.pending
                    .push_back(event(Payload::Deleted(gw::SandboxDeleted {
                        id: id.clone(),
                        name: name.clone(),
                    })));
            }
        }
    }

    fn advance(&mut self, seq: u64) {
        self.cursor = self.cursor.max(seq);
        if !self.ahead.is_empty() && self.cursor >= self.ahead_max {
            self.ahead = HashMap::new();
        }
    }

    /// Runs a database read for this watch, at most [`WATCH_READERS`]
    /// watches at a time. The read runs in a task of its own: a stream
    /// that its client stops polling must not keep a reader's turn.
    async fn read<T, F>(&self, op: F) -> std::result::Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T> + Send + 'static,
    {
        let reads = Arc::clone(&self.gateway.watches.reads);
        let gateway = Arc::clone(&self.gateway);
        let read = tokio::spawn(async move {
            let _turn = reads
                .acquire_owned()
                .await
                .map_err(|_| Error::ShuttingDown)?;
            gateway.db(op).await
        });
        match read.await {
            Ok(result) => Ok(result?),
            Err(error) => Err(Status::from(Error::Internal(format!(
                "a watch's read failed: {error}"
            )))),
        }
    }

    /// Sends the next page of the first queued listing.
    async fn list_page(&mut self) -> std::result::Result<(), Status> {
        let Some(listing) = self.listings.front().cloned() else {
            return Ok(());
        };
        let query = ListQuery {
            driver: listing.driver.or_else(|| self.driver.clone()),
            name: self.name.clone(),
            after_name: listing.after,
            limit: PAGE_ROWS,
            max_bytes: PAGE_BYTES,
            ..ListQuery::default()
        };
        let (rows, more) = self.read(move |s| s.list_for_watch(&query)).await?;
        let last = rows.last().map(|(_, row)| row.name.clone());
        for (seq, row) in rows {
            if seq > self.cursor {
                self.ahead_max = self.ahead_max.max(seq);
                self.ahead.insert(row.id.clone(), seq);
            }
            let sandbox = self.view(&row);
            self.pending.push_back(event(Payload::Sandbox(sandbox)));
        }
        match (more, last) {
            (true, Some(last)) => {
                if let Some(front) = self.listings.front_mut() {
                    front.after = Some(last);
                }
            }
            _ => {
                self.listings.pop_front();
            }
        }
        Ok(())
    }

    /// Sends the next page of what changed since the cursor, from the
    /// database.
    async fn catch_up_page(&mut self) -> std::result::Result<(), Status> {
        let cursor = self.cursor;
        let driver = self.driver.clone();
        let name = self.name.clone();
        let caught = self
            .read(move |s| {
                s.changes_since(
                    cursor,
                    driver.as_deref(),
                    name.as_deref(),
                    PAGE_ROWS,
                    PAGE_BYTES,
                )
            })
            .await?;
        let Some(caught) = caught else {
            return Err(Status::aborted(
                "this watch fell too far behind: more sandboxes were deleted since it last \
                 read than the gateway remembers; watch again",
            ));
        };
        for (seq, change) in &caught.changes {
            self.emit(*seq, change);
        }
        self.advance(caught.cursor);
        if caught.complete {
            self.lagged = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a pacer gathering for `every`, and a watcher that reports each
    /// head it is woken with.
    fn paced(
        every: Duration,
    ) -> (
        watch::Sender<u64>,
        tokio::sync::mpsc::UnboundedReceiver<u64>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let feed = watch::Sender::new(0);
        let paced = Arc::new(watch::Sender::new(0));
        let stop = CancellationToken::new();
        let mut woken = paced.subscribe();
        let pacer = tokio::spawn(pace(feed.subscribe(), paced, every, stop.clone()));
        let (report, seen) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while woken.changed().await.is_ok() {
                let _ = report.send(*woken.borrow_and_update());
            }
        });
        (feed, seen, stop, pacer)
    }

    /// Lets every other task run.
    async fn settle() {
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
    }

    /// Closes in a burst release memory once, `delay` after the first;
    /// a close during the interval that follows releases once more, when
    /// the interval is over; nothing after shutdown.
    #[tokio::test(start_paused = true)]
    async fn closed_watches_release_memory_once_per_burst() {
        let closed = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let started = tokio::time::Instant::now();
        // When each release ran, after `started`.
        let times = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&times);
        let releaser = tokio::spawn(release_after_closes(
            Arc::clone(&closed),
            Duration::from_secs(1),
            Duration::from_secs(10),
            stop.clone(),
            move || seen.lock().expect("times").push(started.elapsed()),
        ));
        let released = || times.lock().expect("times").len();
        for _ in 0..100 {
            closed.notify_one();
        }
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(released(), 0, "not before the delay");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(released(), 1, "once for the whole burst");
        closed.notify_one();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(released(), 1, "not again within the interval");
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(released(), 2, "once more after it");
        let second = times.lock().expect("times")[1];
        assert!(second >= Duration::from_secs(10), "{second:?}");
        stop.cancel();
        closed.notify_one();
        releaser.await.expect("releaser");
        assert_eq!(released(), 2, "nothing after shutdown");
    }

    /// Ten changes pushed one by one, each giving the pacer and the watcher
    /// a chance to run, wake the watcher once, with the last of them; a
    /// change after that wakes it again.
    #[tokio::test]
    async fn a_burst_of_changes_wakes_a_watch_once() {
        let (feed, mut seen, stop, pacer) = paced(Duration::from_secs(1));
        for seq in 1..=10 {
            feed.send_replace(seq);
            settle().await;
        }
        assert_eq!(seen.recv().await, Some(10), "the whole burst at once");
        feed.send_replace(11);
        assert_eq!(seen.recv().await, Some(11), "a later change wakes it too");
        stop.cancel();
        pacer.await.expect("pacer");
        assert_eq!(seen.recv().await, None, "no other wake-up");
    }

    /// With no gathering, every change still reaches the watcher, the last
    /// one last.
    #[tokio::test]
    async fn without_coalescing_changes_pass_at_once() {
        let (feed, mut seen, stop, pacer) = paced(Duration::ZERO);
        let mut last = 0;
        for seq in 1..=10 {
            feed.send_replace(seq);
            settle().await;
            while let Ok(head) = seen.try_recv() {
                assert!(head > last, "{head} after {last}");
                last = head;
            }
        }
        assert_eq!(last, 10);
        stop.cancel();
        pacer.await.expect("pacer");
    }
}
