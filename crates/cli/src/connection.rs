//! The CLI's channel to rekeyd when there are several replicas: a tower
//! service under the generated `AdminServiceClient`, so every call (present
//! and future) finds the leader the same way without knowing it.
//!
//! The first address that accepts a connection answers every call (a
//! follower serves reads). A call a follower refuses with a leader hint
//! (`rekey_common::ha`) is sent once more, to the leader, and the leader
//! answers the calls after it. A refusal without a hint (an election) is
//! sent to the other addresses in order; when none serves it the call fails
//! with "no leader: ... tried A (why), B (why)". A transport failure in the
//! middle of a call is returned as it is, never retried: a mutation that
//! may have reached the leader is not sent twice.
//!
//! Requests are buffered to be sent again; admin requests are small.

use anyhow::{Result, anyhow};
use http_body_util::BodyExt;
use rekey_common::error::chain;
use rekey_common::ha::{self, Coordinators, Refusal};
use rekey_common::tls;
use rustls::ClientConfig;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::transport::Channel;
use tower::{Service, ServiceExt};

/// The message prefix of a call no replica would serve.
pub(crate) const NO_LEADER: &str = "no leader:";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The channel every admin call goes through; cheap to clone.
#[derive(Clone)]
pub(crate) struct Replicas {
    shared: Arc<Shared>,
}

struct Shared {
    addresses: Vec<String>,
    tls: Arc<ClientConfig>,
    verbose: bool,
    /// The replica answering calls now, and its channel.
    current: Mutex<(String, Channel)>,
}

impl Replicas {
    /// Connects to the first of `addresses` that answers.
    pub(crate) async fn connect(addresses: Vec<String>, tls: Arc<ClientConfig>, verbose: bool) -> Result<Replicas> {
        let mut failures = Vec::new();
        for addr in &addresses {
            match tls::connect(addr, tls.clone()).await {
                Ok(channel) => {
                    if verbose {
                        eprintln!("rekey: connected to {addr}");
                    }
                    let current = Mutex::new((addr.clone(), channel));
                    return Ok(Replicas { shared: Arc::new(Shared { addresses, tls, verbose, current }) });
                }
                Err(e) => failures.push((addr.clone(), chain(&e))),
            }
        }
        Err(match failures.as_slice() {
            [(addr, why)] => anyhow!("cannot connect to rekeyd at {addr}: {why}"),
            _ => anyhow!("cannot connect to any rekeyd replica: tried {}", tried(&failures)),
        })
    }

    /// The replica that answered the last call (or was connected first).
    pub(crate) fn addr(&self) -> String {
        self.current().0
    }

    /// Every configured address, in order.
    pub(crate) fn addresses(&self) -> &[String] {
        &self.shared.addresses
    }

    fn current(&self) -> (String, Channel) {
        self.shared.current.lock().expect("not poisoned").clone()
    }

    fn note(&self, text: impl FnOnce() -> String) {
        if self.shared.verbose {
            eprintln!("rekey: {}", text());
        }
    }

    async fn send(self, req: http::Request<Body>) -> Result<http::Response<Body>, BoxError> {
        let (parts, body) = req.into_parts();
        let bytes = body.collect().await?.to_bytes();
        let request = || http::Request::from_parts(parts.clone(), Body::new(http_body_util::Full::new(bytes.clone())));
        let (first, channel) = self.current();
        let response = channel.oneshot(request()).await?;
        let Some(refusal) = refusal_of(&response) else {
            self.note(|| format!("{first} answered"));
            return Ok(response);
        };
        let mut failures = vec![(first.clone(), describe(&refusal))];
        let mut addresses = Coordinators::new(self.shared.addresses.clone());
        addresses.found(&first);
        addresses.new_pass();
        addresses.next_address(); // `first`, just tried
        let mut redirected = false;
        if let Refusal::Leader(leader) = &refusal {
            self.note(|| format!("{first} is a follower; sending the call to the leader at {leader}"));
            addresses.follow(leader);
            redirected = true;
        }
        while let Some(addr) = addresses.next_address() {
            let channel = match tls::connect(&addr, self.shared.tls.clone()).await {
                Ok(c) => c,
                Err(e) => {
                    failures.push((addr, chain(&e)));
                    continue;
                }
            };
            let response = channel.clone().oneshot(request()).await?;
            match refusal_of(&response) {
                None => {
                    self.note(|| format!("{addr} answered"));
                    *self.shared.current.lock().expect("not poisoned") = (addr, channel);
                    return Ok(response);
                }
                Some(Refusal::Leader(leader)) if !redirected => {
                    self.note(|| format!("{addr} is a follower; sending the call to the leader at {leader}"));
                    addresses.follow(&leader);
                    redirected = true;
                    failures.push((addr, describe(&Refusal::Leader(leader))));
                }
                Some(other) => failures.push((addr, describe(&other))),
            }
        }
        let message =
            format!("{NO_LEADER} an election is in progress or every replica is down; tried {}", tried(&failures));
        Ok(tonic::Status::unavailable(message).into_http())
    }
}

/// A follower's refusal carried by a trailers-only response.
fn refusal_of(response: &http::Response<Body>) -> Option<Refusal> {
    tonic::Status::from_header_map(response.headers()).and_then(|s| ha::refusal(&s))
}

fn describe(refusal: &Refusal) -> String {
    match refusal {
        Refusal::Leader(leader) => format!("a follower; the leader is at {leader}"),
        Refusal::NoLeader => "a follower; no leader is known".into(),
    }
}

fn tried(failures: &[(String, String)]) -> String {
    failures.iter().map(|(a, why)| format!("{a} ({why})")).collect::<Vec<_>>().join(", ")
}

impl Service<http::Request<Body>> for Replicas {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each call waits for its own channel's readiness (`oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        Box::pin(self.clone().send(req))
    }
}
