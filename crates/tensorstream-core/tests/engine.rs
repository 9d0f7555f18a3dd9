//! The request engine: priorities, promotion, cancellation, per-request errors, shutdown.
//! Ordering is made deterministic with a gate backend that holds reads until released, so
//! nothing here depends on timing.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tensorstream_core::io::{
    AlignedBuf, BackendStats, FaultPlan, FaultyBackend, MmapBackend, PreadBackend, ReadBackend,
};
use tensorstream_core::store::{DType, Extent, Store, UnitLayout};
use tensorstream_core::{Engine, EngineConfig, Error, Priority, Result, Ticket};

/// A backend that logs the offset of every read as it starts and holds it until opened.
#[derive(Clone)]
struct Gate(Arc<GateInner>);

struct GateInner {
    inner: MmapBackend,
    open: Mutex<bool>,
    cv: Condvar,
    started: AtomicUsize,
    log: Mutex<Vec<u64>>,
}

impl Gate {
    fn closed() -> Self {
        Gate(Arc::new(GateInner {
            inner: MmapBackend::new(),
            open: Mutex::new(false),
            cv: Condvar::new(),
            started: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
        }))
    }

    fn open(&self) {
        *self.0.open.lock().unwrap() = true;
        self.0.cv.notify_all();
    }

    /// Block until `n` reads have started (and are held at the gate).
    fn wait_started(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.0.started.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "reads did not start");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn log(&self) -> Vec<u64> {
        self.0.log.lock().unwrap().clone()
    }
}

impl ReadBackend for Gate {
    fn name(&self) -> String {
        "gate".into()
    }

    fn read_into(&self, path: &Path, offset: u64, dst: &mut [u8]) -> Result<()> {
        self.0.log.lock().unwrap().push(offset);
        self.0.started.fetch_add(1, Ordering::SeqCst);
        let mut open = self.0.open.lock().unwrap();
        while !*open {
            open = self.0.cv.wait(open).unwrap();
        }
        drop(open);
        self.0.inner.read_into(path, offset, dst)
    }
}

/// Shares a backend between the engine and the test, which changes its fault plan.
struct Shared<B>(Arc<B>);

impl<B: ReadBackend> ReadBackend for Shared<B> {
    fn name(&self) -> String {
        self.0.name()
    }
    fn read_into(&self, path: &Path, offset: u64, dst: &mut [u8]) -> Result<()> {
        self.0.read_into(path, offset, dst)
    }
    fn stats(&self) -> BackendStats {
        self.0.stats()
    }
}

/// A store of `n` small units "u0", "u1", ... (one chunk each) and one 9 MiB unit "big".
struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    units: Vec<UnitData>,
}

impl Fixture {
    fn new(n: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.tstore");
        let mut units: Vec<UnitData> = (0..n)
            .map(|i| UnitData {
                name: format!("u{i}"),
                tensors: vec![TensorData::new(
                    "w",
                    DType::F32,
                    &[100 + i as u64],
                    i as u64,
                )],
            })
            .collect();
        units.push(UnitData {
            name: "big".into(),
            tensors: vec![TensorData::new("w", DType::U8, &[9 << 20], 99)],
        });
        write_store(&path, "fp", &units).unwrap();
        let store = Store::open(&path).unwrap();
        Fixture {
            _dir: dir,
            store,
            units,
        }
    }

    fn layout(&self, name: &str) -> UnitLayout {
        self.store
            .layout(self.store.unit_index(name).unwrap())
            .unwrap()
    }

    fn offset_of(&self, name: &str) -> u64 {
        self.layout(name).extents[0].file_offset
    }

    fn buf(&self, name: &str) -> AlignedBuf {
        AlignedBuf::new(self.layout(name).buffer_len as usize)
    }

    fn check(&self, name: &str, buf: &AlignedBuf) {
        let u = self.units.iter().find(|u| u.name == name).unwrap();
        let slot = &self.layout(name).tensors[0];
        assert!(
            buf[slot.offset as usize..(slot.offset + slot.nbytes) as usize]
                == u.tensors[0].data[..],
            "unit {name} read wrong bytes"
        );
    }
}

fn engine_with(backend: impl ReadBackend + 'static, threads: usize) -> Engine {
    engine(Arc::new(backend), threads)
}

fn submit(engine: &Engine, layout: &UnitLayout, buf: &mut AlignedBuf, p: Priority) -> Ticket {
    // SAFETY: every test keeps `buf` alive and untouched until the ticket is waited for or
    // the engine is dropped.
    unsafe { engine.submit(layout, buf.as_mut_ptr(), buf.len(), p) }.unwrap()
}

#[test]
fn demand_goes_ahead_of_queued_prefetches() {
    let fx = Fixture::new(12);
    let gate = Gate::closed();
    let faulty = FaultyBackend::new(gate.clone());
    faulty.set_plan(FaultPlan {
        delay: Some(Duration::from_millis(2)),
        ..Default::default()
    });
    let engine = engine_with(faulty, 1);
    let names: Vec<String> = (0..12).map(|i| format!("u{i}")).collect();
    let mut bufs: Vec<AlignedBuf> = names.iter().map(|n| fx.buf(n)).collect();
    let mut tickets = Vec::new();
    let (first, rest) = bufs.split_at_mut(1);
    tickets.push(submit(
        &engine,
        &fx.layout("u0"),
        &mut first[0],
        Priority::Prefetch,
    ));
    gate.wait_started(1); // u0 is being read; everything below queues behind it.
    for (i, buf) in rest.iter_mut().enumerate().take(10) {
        let name = &names[i + 1];
        tickets.push(submit(&engine, &fx.layout(name), buf, Priority::Prefetch));
    }
    let demand = submit(&engine, &fx.layout("u11"), &mut rest[10], Priority::Demand);
    gate.open();
    engine.wait(&demand).unwrap();
    for t in &tickets {
        engine.wait(t).unwrap();
    }
    let order: Vec<u64> = gate.log();
    let expected: Vec<u64> = [
        "u0", "u11", "u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8", "u9", "u10",
    ]
    .iter()
    .map(|n| fx.offset_of(n))
    .collect();
    assert_eq!(
        order, expected,
        "demand must be read right after the read in flight"
    );
    for (n, b) in names.iter().zip(&bufs) {
        fx.check(n, b);
    }
    let s = engine.stats();
    assert_eq!(
        (s.requests, s.demand_requests, s.prefetch_requests),
        (12, 1, 11)
    );
    // (Waiting on the prefetches in order may promote them; that keeps their order.)
    assert_eq!(s.failed + s.cancelled, 0);
}

#[test]
fn waiting_on_a_prefetch_promotes_it() {
    let fx = Fixture::new(6);
    let gate = Gate::closed();
    let engine = engine_with(gate.clone(), 1);
    let mut bufs: Vec<AlignedBuf> = (0..6).map(|i| fx.buf(&format!("u{i}"))).collect();
    let mut it = bufs.iter_mut();
    let t0 = submit(
        &engine,
        &fx.layout("u0"),
        it.next().unwrap(),
        Priority::Prefetch,
    );
    gate.wait_started(1);
    let rest: Vec<Ticket> = (1..6)
        .map(|i| {
            let name = format!("u{i}");
            submit(
                &engine,
                &fx.layout(&name),
                it.next().unwrap(),
                Priority::Prefetch,
            )
        })
        .collect();
    std::thread::scope(|s| {
        let waiter = s.spawn(|| engine.wait(&rest[3]));
        let deadline = Instant::now() + Duration::from_secs(20);
        while engine.stats().promoted == 0 {
            assert!(
                Instant::now() < deadline,
                "the waited prefetch was not promoted"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        gate.open();
        waiter.join().unwrap().unwrap();
    });
    // Exactly the one waited-for prefetch was promoted. (The waits below may promote the
    // others still queued, as they should, so count before them.)
    let promoted = engine.stats().promoted;
    engine.wait(&t0).unwrap();
    for t in &rest {
        engine.wait(t).unwrap();
    }
    let expected: Vec<u64> = ["u0", "u4", "u1", "u2", "u3", "u5"]
        .iter()
        .map(|n| fx.offset_of(n))
        .collect();
    assert_eq!(gate.log(), expected);
    assert_eq!(promoted, 1);
    // Waiting again returns the same outcome at once.
    engine.wait(&rest[3]).unwrap();
}

#[test]
fn cancel_queued_and_in_flight_requests() {
    let fx = Fixture::new(4);
    let gate = Gate::closed();
    let engine = engine_with(gate.clone(), 1);
    let (mut b0, mut b1, mut b2, mut big) =
        (fx.buf("u0"), fx.buf("u1"), fx.buf("u2"), fx.buf("big"));
    let a = submit(&engine, &fx.layout("u0"), &mut b0, Priority::Demand);
    gate.wait_started(1); // a is in flight
    let b = submit(&engine, &fx.layout("u1"), &mut b1, Priority::Prefetch);
    let c = submit(&engine, &fx.layout("u2"), &mut b2, Priority::Demand);
    let d = submit(&engine, &fx.layout("big"), &mut big, Priority::Prefetch);
    assert_eq!(b.unit(), "u1");

    // Queued: finished at once, with Cancelled.
    engine.cancel(&b);
    assert!(b.is_finished());
    match engine.wait(&b) {
        Err(Error::Cancelled { unit }) => assert_eq!(unit, "u1"),
        other => panic!("{other:?}"),
    }
    // In flight: finishes when its read does, still with Cancelled.
    engine.cancel(&a);
    assert!(!a.is_finished(), "the read in flight holds the ticket open");
    gate.open();
    assert!(matches!(engine.wait(&a), Err(Error::Cancelled { .. })));
    // The others are unaffected.
    engine.wait(&c).unwrap();
    fx.check("u2", &b2);
    engine.wait(&d).unwrap();
    fx.check("big", &big);
    // Cancelling a finished request changes nothing; waiting twice gives the same outcome.
    engine.cancel(&c);
    engine.wait(&c).unwrap();
    assert!(matches!(engine.wait(&b), Err(Error::Cancelled { .. })));
    let s = engine.stats();
    assert_eq!(s.cancelled, 2);
    assert_eq!(s.failed, 0);
}

#[test]
fn cancel_a_multi_chunk_request_midway() {
    let fx = Fixture::new(1);
    let gate = Gate::closed();
    let engine = engine_with(gate.clone(), 2);
    let mut big = fx.buf("big");
    let t = submit(&engine, &fx.layout("big"), &mut big, Priority::Demand);
    gate.wait_started(2); // two of its three chunks in flight, one queued
    engine.cancel(&t);
    assert!(!t.is_finished());
    gate.open();
    assert!(matches!(engine.wait(&t), Err(Error::Cancelled { .. })));
    assert_eq!(gate.log().len(), 2, "the queued chunk is never read");
    // The engine reads the unit fine afterwards.
    let mut again = fx.buf("big");
    let t = submit(&engine, &fx.layout("big"), &mut again, Priority::Demand);
    engine.wait(&t).unwrap();
    fx.check("big", &again);
}

#[test]
fn injected_eio_fails_only_its_own_request() {
    let fx = Fixture::new(4);
    let faulty = Arc::new(FaultyBackend::new(MmapBackend::new()));
    let engine = engine_with(Shared(faulty.clone()), 1);
    faulty.set_plan(FaultPlan {
        fail_read: Some(2),
        ..Default::default()
    });
    let mut bufs: Vec<AlignedBuf> = (0..3).map(|i| fx.buf(&format!("u{i}"))).collect();
    let tickets: Vec<Ticket> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| submit(&engine, &fx.layout(&format!("u{i}")), b, Priority::Demand))
        .collect();
    // One worker serves the queue in order, so read number 2 is u1's.
    engine.wait(&tickets[0]).unwrap();
    match engine.wait(&tickets[1]) {
        Err(e @ Error::Io { .. }) => {
            let msg = e.to_string();
            let Error::Io {
                path, unit, source, ..
            } = e
            else {
                unreachable!()
            };
            assert_eq!(unit.as_deref(), Some("u1"));
            assert_eq!(path, fx.store.path());
            assert_eq!(source.raw_os_error(), Some(libc::EIO));
            assert!(msg.contains("u1") && msg.contains("e.tstore"), "{msg}");
        }
        other => panic!("expected EIO, got {other:?}"),
    }
    engine.wait(&tickets[2]).unwrap();
    fx.check("u0", &bufs[0]);
    fx.check("u2", &bufs[2]);
    assert_eq!(engine.stats().failed, 1);
    // The next request for the failed unit succeeds.
    let mut again = fx.buf("u1");
    let t = submit(&engine, &fx.layout("u1"), &mut again, Priority::Demand);
    engine.wait(&t).unwrap();
    fx.check("u1", &again);
}

#[test]
fn eio_in_one_chunk_fails_the_whole_request_and_nothing_else() {
    let fx = Fixture::new(1);
    let faulty = Arc::new(FaultyBackend::new(PreadBackend::new(true)));
    let engine = engine_with(Shared(faulty.clone()), 2);
    faulty.set_plan(FaultPlan {
        fail_read: Some(2),
        ..Default::default()
    });
    let mut big = fx.buf("big");
    let t = submit(&engine, &fx.layout("big"), &mut big, Priority::Demand);
    match engine.wait(&t) {
        Err(Error::Io { unit, .. }) => assert_eq!(unit.as_deref(), Some("big")),
        other => panic!("{other:?}"),
    }
    let mut again = fx.buf("big");
    let t = submit(&engine, &fx.layout("big"), &mut again, Priority::Demand);
    engine.wait(&t).unwrap();
    fx.check("big", &again);
}

#[test]
fn every_read_failing_then_recovering() {
    let fx = Fixture::new(3);
    let faulty = Arc::new(FaultyBackend::new(MmapBackend::new()));
    let engine = engine_with(Shared(faulty.clone()), 2);
    faulty.set_plan(FaultPlan {
        fail_from: Some(1),
        ..Default::default()
    });
    let mut bufs: Vec<AlignedBuf> = (0..3).map(|i| fx.buf(&format!("u{i}"))).collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        let t = submit(&engine, &fx.layout(&format!("u{i}")), b, Priority::Prefetch);
        assert!(matches!(engine.wait(&t), Err(Error::Io { .. })));
    }
    faulty.set_plan(FaultPlan::default());
    for (i, b) in bufs.iter_mut().enumerate() {
        let name = format!("u{i}");
        let t = submit(&engine, &fx.layout(&name), b, Priority::Prefetch);
        engine.wait(&t).unwrap();
        fx.check(&name, b);
    }
    assert_eq!(engine.stats().failed, 3);
}

#[test]
fn short_read_is_an_io_error() {
    let fx = Fixture::new(2);
    let faulty = Arc::new(FaultyBackend::new(MmapBackend::new()));
    let engine = engine_with(Shared(faulty.clone()), 1);
    faulty.set_plan(FaultPlan {
        short_read: Some(1),
        ..Default::default()
    });
    let mut b = fx.buf("u1");
    let t = submit(&engine, &fx.layout("u1"), &mut b, Priority::Demand);
    match engine.wait(&t) {
        Err(Error::Io { unit, source, .. }) => {
            assert_eq!(unit.as_deref(), Some("u1"));
            assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof);
        }
        other => panic!("{other:?}"),
    }
    let t = submit(&engine, &fx.layout("u1"), &mut b, Priority::Demand);
    engine.wait(&t).unwrap();
}

/// A layout that reaches past the end of its file: both real backends report the end of
/// file as an error naming the unit, never a silent short read.
#[test]
fn reading_past_the_end_of_a_file_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short.bin");
    std::fs::write(&path, bytes(1, 10_000)).unwrap();
    let layouts = [(8192u64, 4096u64), (0, 16384), (9000, 2000), (4096, 8192)];
    for (bname, backend) in backends() {
        let engine = engine(backend, 2);
        for (off, len) in layouts {
            let layout = UnitLayout {
                name: "past-end".into(),
                files: vec![path.clone()],
                extents: vec![Extent {
                    file: 0,
                    file_offset: off,
                    len,
                    dest_offset: 0,
                }],
                chunks: vec![],
                buffer_len: len.next_multiple_of(4096),
                tensors: vec![],
                checksum: None,
            };
            match read_unit(&engine, &layout) {
                Err(Error::Io { unit, source, .. }) => {
                    assert_eq!(unit.as_deref(), Some("past-end"), "{bname}");
                    assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof, "{bname}");
                }
                other => panic!("{bname} {off}+{len}: {:?}", other.map(|_| ())),
            }
        }
    }
}

#[test]
fn dropping_the_engine_with_pending_requests_does_not_hang() {
    let fx = Fixture::new(30);
    let faulty = FaultyBackend::new(MmapBackend::new());
    faulty.set_plan(FaultPlan {
        delay: Some(Duration::from_millis(10)),
        ..Default::default()
    });
    let engine = engine_with(faulty, 2);
    let mut bufs: Vec<AlignedBuf> = (0..30).map(|i| fx.buf(&format!("u{i}"))).collect();
    let tickets: Vec<Ticket> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| submit(&engine, &fx.layout(&format!("u{i}")), b, Priority::Prefetch))
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    let dropper = std::thread::spawn(move || {
        drop(engine);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("dropping the engine hung");
    dropper.join().unwrap();
    assert!(tickets.iter().all(Ticket::is_finished));
    drop(bufs);
}

#[test]
fn many_concurrent_requests_with_cancels() {
    let fx = Fixture::new(40);
    let engine = engine(Arc::new(PreadBackend::new(true)), 4);
    for round in 0..3 {
        let names: Vec<String> = (0..40).map(|i| format!("u{i}")).collect();
        let mut bufs: Vec<AlignedBuf> = names.iter().map(|n| fx.buf(n)).collect();
        let tickets: Vec<Ticket> = bufs
            .iter_mut()
            .zip(&names)
            .enumerate()
            .map(|(i, (b, n))| {
                let p = if i % 2 == 0 {
                    Priority::Demand
                } else {
                    Priority::Prefetch
                };
                let t = submit(&engine, &fx.layout(n), b, p);
                if i % 3 == round % 3 {
                    engine.cancel(&t);
                }
                t
            })
            .collect();
        for (i, t) in tickets.iter().enumerate().rev() {
            match engine.wait(t) {
                Ok(()) => fx.check(&names[i], &bufs[i]),
                Err(Error::Cancelled { unit }) => {
                    assert_eq!(i % 3, round % 3, "only cancelled requests report Cancelled");
                    assert_eq!(unit, names[i]);
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    assert_eq!(engine.stats().failed, 0);
}

#[test]
fn bad_configs_and_requests_are_invalid_arguments() {
    let mk = |threads, chunk| {
        Engine::new(
            Arc::new(MmapBackend::new()),
            EngineConfig {
                num_threads: threads,
                chunk_bytes: chunk,
            },
        )
    };
    for (threads, chunk) in [
        (0, 4 << 20),
        (257, 4 << 20),
        (1, 0),
        (1, 1 << 20),
        (1, (4 << 20) + 1),
    ] {
        assert!(
            matches!(mk(threads, chunk), Err(Error::InvalidArgument(_))),
            "{threads} threads, {chunk}-byte chunks"
        );
    }
    let fx = Fixture::new(1);
    let engine = mk(1, 4 << 20).unwrap();
    let good = fx.layout("u0");
    let mut small = AlignedBuf::new(good.buffer_len as usize - 1);
    let inv = |layout: &UnitLayout, buf: &mut AlignedBuf| {
        // SAFETY: nothing is submitted when the arguments are refused; a submitted request
        // is waited for below before `buf` goes.
        let r = unsafe { engine.submit(layout, buf.as_mut_ptr(), buf.len(), Priority::Demand) };
        match r {
            Err(Error::InvalidArgument(_)) => true,
            Err(_) => false,
            Ok(t) => {
                let _ = engine.wait(&t);
                false
            }
        }
    };
    assert!(inv(&good, &mut small), "buffer too small");
    let mut buf = AlignedBuf::new(1 << 16);
    let mut l = good.clone();
    l.extents[0].file = 1;
    assert!(inv(&l, &mut buf), "extent names a missing file");
    let mut l = good.clone();
    l.extents[0].dest_offset = u64::MAX - 10;
    assert!(inv(&l, &mut buf), "extent end overflows");
    let mut l = good.clone();
    l.extents[0].len = u64::MAX;
    assert!(inv(&l, &mut buf), "extent length overflows");
    let mut l = good.clone();
    l.buffer_len = 8192;
    l.extents.push(Extent {
        file: 0,
        file_offset: 0,
        len: 4096,
        dest_offset: 4096,
    });
    assert!(inv(&l, &mut buf), "a checksum over two extents");
    let mut l = good.clone();
    l.checksum = None;
    l.buffer_len = 8192;
    l.extents.push(Extent {
        file: 0,
        file_offset: 8192,
        len: 4096,
        dest_offset: 2048,
    });
    assert!(inv(&l, &mut buf), "extents overlapping in the buffer");

    // A layout with nothing to read completes at once.
    let empty = UnitLayout {
        name: "empty".into(),
        files: vec![PathBuf::from("/nonexistent")],
        extents: vec![],
        chunks: vec![],
        buffer_len: 0,
        tensors: vec![],
        checksum: None,
    };
    let t = submit(&engine, &empty, &mut buf, Priority::Demand);
    assert!(t.is_finished());
    engine.wait(&t).unwrap();
}

#[test]
fn active_time_is_wall_time_with_a_job_not_summed_over_workers() {
    let fx = Fixture::new(4);
    let faulty = FaultyBackend::new(MmapBackend::new());
    faulty.set_plan(FaultPlan {
        delay: Some(Duration::from_millis(40)),
        ..Default::default()
    });
    let engine = engine_with(faulty, 4);
    let names: Vec<String> = (0..4).map(|i| format!("u{i}")).collect();
    let mut bufs: Vec<AlignedBuf> = names.iter().map(|n| fx.buf(n)).collect();
    let t0 = Instant::now();
    let tickets: Vec<Ticket> = names
        .iter()
        .zip(bufs.iter_mut())
        .map(|(n, b)| submit(&engine, &fx.layout(n), b, Priority::Prefetch))
        .collect();
    for t in &tickets {
        engine.wait(t).unwrap();
    }
    let wall = t0.elapsed().as_nanos() as u64;
    std::thread::sleep(Duration::from_millis(50)); // idle: not counted
    let s = engine.stats();
    assert!(s.active_ns >= 40_000_000, "one read took 40 ms: {s:?}");
    assert!(s.active_ns <= wall, "active {} > wall {wall}", s.active_ns);
    // Four workers read in parallel: their summed busy time exceeds the wall time active.
    assert!(s.busy_ns > s.active_ns + 40_000_000, "{s:?}");
}
