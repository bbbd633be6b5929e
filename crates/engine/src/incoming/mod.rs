//! The destination side of a migration.
//!
//! [`receive_vm`] accepts one session on a listener, builds the guest and the devices the
//! source describes, receives memory and device chunks on one thread per data channel, loads
//! each device's stream in order on a loader thread of its own (started at setup, so precopy
//! device data loads while the guest still runs on the source), then applies the small
//! devices' blobs in list order, the guest's state last, and resumes the guest only once the
//! source has handed it over. Every thread belongs to the session's `Runtime`
//! (`crate::runtime`) and is joined before `receive` returns; after any
//! failure the guest is dropped, never resumed.
//!
//! Setting up (`setup.rs`, `session.rs`) is straight-line; the session's coordinator then
//! runs the phases of `coordinator::Phase`, one file each, every transition consuming the
//! phase it leaves:
//!
//! ```text
//!  accept_session --> build guest, devices --> accept_channels --> start the threads
//!    (refused: Reject, wait on)                                        |
//!                                                                      v
//!  Receiving (receiving.rs): GuestState, VmStates, rounds synced at every RoundEnd, credit,
//!    |   loaders' ends; pings the source while idle; Complete due within the peer timeout
//!    |   once every data channel saw its last round
//!    | Complete + every channel's last round + every loader done (+ no torn page left)
//!    v
//!  Loading (loading.rs): small devices in list order, guest state, verify --> Loaded sent
//!    |
//!    v
//!  AwaitingHandover (handover.rs): Handover due within the peer timeout; Credit and
//!    |   RoundApplied ignored, anything else a protocol error
//!    v
//!  Running (handover.rs): guest resumed --> Resumed sent (ResumedUntold logged if it fails)
//!
//!  any error, in any phase: barrier and streams aborted, Reject sent to the source, every
//!  socket shut, every thread joined, guest dropped, error returned
//! ```

mod barrier;
mod coordinator;
mod handover;
#[cfg(feature = "test-hooks")]
mod late_pages;
mod loading;
mod main_reader;
mod postcopy;
mod receiver;
mod receiving;
mod recover;
mod session;
mod setup;
mod streams;

use crate::config::IncomingConfig;
use crate::device::{Device, DeviceError, DeviceFactory, VmState};
use crate::error::{ChannelError, ChannelName, IncomingError};
use crate::framed;
use crate::guest::{Guest, GuestFactory};
use crate::hostmem::Populated;
use crate::report::{IncomingEvent, IncomingReport};
use crate::transport::{Listener, Stream};
use coordinator::Ended;
use livemig_wire::{
    Complete, DeviceLoadStats, Features, RamTransfer, Reject, RejectCode, RoundStart,
    SessionAccept, SessionHello,
};
use session::Session;
use std::time::Instant;

/// What the coordinator hears from its threads: progress, or a failure that ends the
/// migration ([`Heard`]).
pub(crate) enum Event {
    /// A data channel received its last round; the count of rounds it saw.
    ChannelDone(u32),
    /// Every data channel has applied every page of a round.
    RoundApplied(u32),
    State(Vec<u8>),
    VmStates(Vec<u8>),
    RoundStart(RoundStart),
    Complete(Complete),
    /// The source gave the guest up (and says whether it stays paused here).
    Handover(livemig_wire::Handover),
    /// A device's loader consumed a chunk: the source may send up to `up_to`.
    Credit(u16, u32),
    LoaderDone(u16, DeviceLoadStats),
    /// The source switches to postcopy: the pages it will still send.
    PostcopyStart(livemig_wire::PostcopyStart),
    /// Postcopy: a vCPU waits for this page, which has not been asked for yet.
    PageWanted(u64),
    /// Postcopy: a data channel has sent its last page.
    PostcopyChannelDone,
}

/// A thread's failure, sent to the coordinator before the thread ends.
pub(crate) enum Failure {
    /// A data channel's.
    Channel(ChannelError),
    /// The main channel reader's (a Reject from the source among them).
    Main(ChannelError),
    /// A device loader's.
    Loader(DeviceError),
    /// Postcopy's fault thread's.
    Postcopy(crate::postcopy::PostcopyError),
}

/// One message from a thread to the coordinator.
pub(crate) type Heard = Result<Event, Failure>;

impl From<Failure> for IncomingError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Channel(e) | Failure::Main(e) => e.into(),
            Failure::Loader(e) => e.into(),
            Failure::Postcopy(e) => e.into(),
        }
    }
}

/// Builds what a source describes: the destination's half of the embedding contract.
#[derive(Clone, Copy)]
pub struct Factories<'a> {
    /// Builds the guest ([`GuestFactory::create`], or [`GuestFactory::create_on`] in local
    /// mode).
    pub guest: &'a dyn GuestFactory,
    /// Builds each device's twin.
    pub devices: &'a dyn DeviceFactory,
}

/// A VM received, loaded and running on this side: the embedder now owns it.
pub struct Incoming {
    /// The guest, resumed: it runs here, and the source's copy stays paused for good.
    pub guest: Box<dyn Guest>,
    /// The streamed devices' twins, loaded, in the source's order.
    pub devices: Vec<Box<dyn Device>>,
    /// The small devices' twins, loaded, in the source's order.
    pub vmstates: Vec<Box<dyn VmState>>,
    /// How the migration went on this side.
    pub report: IncomingReport,
}

/// Refuses every device: for destinations that receive bare guests.
struct NoDevices;

impl DeviceFactory for NoDevices {
    fn create_device(
        &self,
        d: &crate::device::DeviceDescriptor,
    ) -> Result<Box<dyn Device>, DeviceError> {
        Err(DeviceError::new(
            &d.name,
            "create",
            "this destination takes no devices",
        ))
    }
    fn create_vmstate(
        &self,
        d: &crate::device::DeviceDescriptor,
    ) -> Result<Box<dyn VmState>, DeviceError> {
        Err(DeviceError::new(
            &d.name,
            "create",
            "this destination takes no devices",
        ))
    }
}

/// Waits for one incoming migration of a guest without devices and runs it to the end:
/// [`receive_vm`] with a device factory that refuses every device (a session with devices
/// is refused, and the wait goes on).
pub fn receive(
    listener: &Listener,
    factory: &dyn GuestFactory,
    config: &IncomingConfig,
    log: &(dyn Fn(&IncomingEvent) + Sync),
) -> Result<Incoming, IncomingError> {
    let f = Factories {
        guest: factory,
        devices: &NoDevices,
    };
    receive_vm(listener, f, config, log)
}

/// What a session needs built before it is accepted: its flow bounds, guest and devices.
type Built = (
    SessionAccept,
    Box<dyn Guest>,
    Vec<Box<dyn Device>>,
    Vec<Box<dyn VmState>>,
);

/// The streamed devices' and the small devices' twins.
type Twins = (Vec<Box<dyn Device>>, Vec<Box<dyn VmState>>);

/// Builds what `hello` describes, or the Reject that says why this side cannot.
fn build_session(
    hello: &SessionHello,
    main: &mut Stream,
    factories: Factories<'_>,
    config: &IncomingConfig,
) -> Result<Built, Reject> {
    let accept = setup::flow_bounds(hello, config)?;
    let guest = match hello.ram {
        RamTransfer::Copy => factories.guest.create(&hello.guest),
        RamTransfer::Local => {
            let memory = setup::receive_memory_files(main, hello, config)?;
            factories.guest.create_on(&hello.guest, memory)
        }
    }
    .map_err(|e| unsupported(&e))?;
    let (devices, vmstates) = build_twins(hello, factories)?;
    Ok((accept, guest, devices, vmstates))
}

fn unsupported(e: &dyn std::fmt::Display) -> Reject {
    Reject::new(RejectCode::Unsupported, e.to_string())
}

/// The twins of the devices `hello` describes, in its order.
fn build_twins(hello: &SessionHello, factories: Factories<'_>) -> Result<Twins, Reject> {
    let descriptor = |w: &livemig_wire::WireDevice| crate::device::DeviceDescriptor {
        kind: w.kind.clone(),
        name: w.name.clone(),
        config: w.config.clone(),
    };
    let devices = hello
        .devices
        .devices
        .iter()
        .map(|w| factories.devices.create_device(&descriptor(w)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unsupported(&e))?;
    let vmstates = hello
        .devices
        .vmstates
        .iter()
        .map(|w| factories.devices.create_vmstate(&descriptor(w)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unsupported(&e))?;
    Ok((devices, vmstates))
}

/// A session's hello taken, its bounds and twins built, its channels not yet joined.
struct Taken {
    hello: SessionHello,
    negotiated: setup::Negotiated,
    accept: SessionAccept,
    twins: Twins,
}

/// Waits for one incoming migration on `listener` and runs it to the end.
///
/// Runs on the caller's thread and blocks: first for a source, with no time limit (stop it
/// with [`IncomingConfig::cancel`]); sessions this side cannot build (too much memory, an
/// unknown guest or device kind, more buffering than allowed) are refused with the reason
/// and the wait goes on. Once a session is accepted it runs to its end; every thread it
/// starts (`lm-dst-*`) is joined before this returns. `log` is called on the caller's
/// thread with what happens ([`IncomingEvent`]); it should return quickly.
///
/// A source that abandons a switchover past its hard bound
/// ([`crate::MigrationConfig::downtime_hard_limit`]) goes on in a new connection of the same
/// session: this side keeps guest memory, drops the device twins, and waits (for the peer
/// timeout, at least [`CONTINUATION_WAIT`]) for that session only.
///
/// On `Ok` the guest has been resumed here, after the source handed it over. On `Err`
/// nothing runs here (see [`IncomingError`]) and `listener` can be passed again for the
/// next attempt.
pub fn receive_vm(
    listener: &Listener,
    factories: Factories<'_>,
    config: &IncomingConfig,
    log: &(dyn Fn(&IncomingEvent) + Sync),
) -> Result<Incoming, IncomingError> {
    let (hello, negotiated, mut main, (accept, guest, devices, vmstates)) =
        accept_buildable(listener, factories, config, log)?;
    let start = Instant::now();
    log(&IncomingEvent::SessionAccepted {
        session: hello.session.to_string(),
        guest_kind: hello.guest.kind.clone(),
        memory_bytes: hello.guest.memory_bytes(),
        channels: hello.channels,
        devices: hello.devices.devices.len() + hello.devices.vmstates.len(),
        protocol: negotiated.agreed.version,
        features: negotiated.agreed.features,
    });
    // Guest memory's userfaultfd side outlives a session: a broken postcopy resumes in
    // another.
    let postcopy = hello
        .postcopy
        .then(|| postcopy::PostcopyDest::new(guest.memory()));
    let populated = Populated::new(guest.memory());
    // Pages arrive into small pages, the VMM's huge-page advice given back at the end (see
    // `thp.rs`: a cold host's huge pages cost more to fault in than the pages they hold).
    let _small =
        (hello.ram == RamTransfer::Copy).then(|| crate::thp::SmallPages::receiving(guest.memory()));
    let mut taken = Taken {
        hello,
        negotiated,
        accept,
        twins: (devices, vmstates),
    };
    loop {
        let data = join_channels(listener, config, log, &mut main, &taken)?;
        let session = Session {
            guest: &*guest,
            devices: &taken.twins.0,
            vmstates: &taken.twins.1,
            hello: &taken.hello,
            populated: &populated,
            accept: taken.accept,
            switchover_ack: taken.negotiated.ack_wanted,
            config,
            start,
            log,
        };
        let report = match session.run(main, data, postcopy.as_ref(), None) {
            Ok(Ended::Done(report)) => *report,
            Ok(Ended::Paused(run, e)) => match &postcopy {
                Some(dest) => recover::run(listener, &session, dest, run, e)?,
                None => return Err(e),
            },
            Err(e) if abandoned(&e, &taken.negotiated) => {
                log(&IncomingEvent::SwitchoverAbandoned {
                    session: taken.hello.session.to_string(),
                    reason: e.to_string(),
                });
                (taken, main) = await_continuation(listener, factories, config, log, &taken.hello)?;
                continue;
            }
            Err(e) => return Err(e),
        };
        drop(postcopy);
        let (devices, vmstates) = taken.twins;
        return Ok(Incoming {
            guest,
            devices,
            vmstates,
            report,
        });
    }
}

/// The session is accepted (on `main`) and its data channels joined.
fn join_channels(
    listener: &Listener,
    config: &IncomingConfig,
    log: &(dyn Fn(&IncomingEvent) + Sync),
    main: &mut Stream,
    taken: &Taken,
) -> Result<Vec<Stream>, IncomingError> {
    taken.negotiated.accept(main, &taken.accept)?;
    let data =
        setup::accept_channels(listener, main, &taken.hello, config, log).inspect_err(|e| {
            framed::send_reject(
                main,
                ChannelName::Main,
                &Reject::new(RejectCode::Other, e.to_string()),
            )
        })?;
    session::arm_peer_timeouts(main, &data, &taken.accept)?;
    Ok(data)
}

/// The least a destination waits for a session to go on after its abandoned switchover
/// (the source reconnects as soon as its guest runs again).
pub const CONTINUATION_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether the source abandoned a switchover past its bound and goes on (the session
/// agreed on `switchover retry`). The abandonment may come after `Loaded` was sent (the
/// source's bound ran out before it read it): nothing has run here yet, so that session
/// goes on as well.
fn abandoned(e: &IncomingError, session: &setup::Negotiated) -> bool {
    let retry = session.agreed.features.contains(Features::SWITCHOVER_RETRY);
    retry
        && match e {
            IncomingError::NoHandover(e) => abandoned(e, session),
            IncomingError::Channel(ChannelError::Rejected { reject, .. }) => {
                reject.code == RejectCode::SwitchoverAbandoned
            }
            _ => false,
        }
}

/// Waits for session `abandoned` to go on, and builds its device twins afresh; a hello
/// this side cannot build is refused and the wait goes on, until the deadline.
fn await_continuation(
    listener: &Listener,
    factories: Factories<'_>,
    config: &IncomingConfig,
    log: &(dyn Fn(&IncomingEvent) + Sync),
    abandoned: &SessionHello,
) -> Result<(Taken, Stream), IncomingError> {
    let wait = config.peer_timeout.max(CONTINUATION_WAIT);
    let deadline = Instant::now() + wait;
    let gone = |e| match e {
        IncomingError::Accept(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            IncomingError::Setup(format!(
                "session {}: the source abandoned a switchover and did not go on within {wait:?}",
                abandoned.session
            ))
        }
        e => e,
    };
    loop {
        let (hello, negotiated, mut main) =
            setup::accept_continuation(listener, config, log, abandoned, deadline).map_err(gone)?;
        let built = setup::flow_bounds(&hello, config)
            .and_then(|accept| Ok((accept, build_twins(&hello, factories)?)));
        match built {
            Ok((accept, twins)) => {
                let taken = Taken {
                    hello,
                    negotiated,
                    accept,
                    twins,
                };
                return Ok((taken, main));
            }
            Err(reject) => {
                log(&IncomingEvent::SessionRefused {
                    session: hello.session.to_string(),
                    reason: reject.reason.clone(),
                });
                negotiated.refuse(&mut main, &reject);
            }
        }
    }
}

/// Waits for a session this side can build: one it cannot (too much buffering asked, an
/// unknown guest or device kind) is refused with the reason, and the wait goes on.
fn accept_buildable(
    listener: &Listener,
    factories: Factories<'_>,
    config: &IncomingConfig,
    log: &(dyn Fn(&IncomingEvent) + Sync),
) -> Result<(SessionHello, setup::Negotiated, Stream, Built), IncomingError> {
    loop {
        let (hello, negotiated, mut main) = setup::accept_session(listener, config, log)?;
        match build_session(&hello, &mut main, factories, config) {
            Ok(built) => return Ok((hello, negotiated, main, built)),
            Err(reject) => {
                log(&IncomingEvent::SessionRefused {
                    session: hello.session.to_string(),
                    reason: reject.reason.clone(),
                });
                negotiated.refuse(&mut main, &reject);
            }
        }
    }
}

/// A protocol error on the main channel.
fn protocol(detail: &str) -> IncomingError {
    IncomingError::Channel(ChannelError::Protocol {
        channel: ChannelName::Main,
        detail: detail.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemig_wire::Agreed;

    fn session(features: Features) -> setup::Negotiated {
        setup::Negotiated {
            layout: livemig_wire::Versions::THIS.max,
            agreed: Agreed {
                version: livemig_wire::Versions::THIS.max,
                features,
            },
            ack_wanted: false,
        }
    }

    fn refused(code: RejectCode) -> IncomingError {
        IncomingError::Channel(ChannelError::Rejected {
            channel: ChannelName::Main,
            reject: Reject::new(code, "why"),
        })
    }

    #[test]
    fn an_abandonment_goes_on_in_any_phase_before_the_handover() {
        let retry = session(Features::SWITCHOVER_RETRY);
        let cut = || refused(RejectCode::SwitchoverAbandoned);
        assert!(abandoned(&cut(), &retry));
        // Loaded sent, the handover awaited: the same.
        assert!(abandoned(
            &IncomingError::NoHandover(Box::new(cut())),
            &retry
        ));
        // Any other refusal, or a session without the feature, ends the session.
        assert!(!abandoned(&refused(RejectCode::Other), &retry));
        assert!(!abandoned(
            &IncomingError::NoHandover(Box::new(refused(RejectCode::Cancelled))),
            &retry
        ));
        assert!(!abandoned(&cut(), &session(Features::NONE)));
    }
}
