//! Integration tests against real parts: the control plane from `tests/cluster`, real Git
//! repositories over file:// and `git http-backend`, and the real `edgesync` binary.
//! One control plane serves the whole run; every test works in a namespace of its own.

mod harness;

mod apply;
mod chaos;
mod fleet;
mod gates;
mod git_http;
mod git_revisions;
mod git_ssh;
mod helm;
mod hooks;
mod hostile;
mod install;
mod kustomize;
mod node_targeting;
mod prune;
mod report;
mod report_mqtt;
mod safety;
mod signatures;
mod skeleton;
mod trigger_local;
mod trigger_mqtt;
mod trigger_webhook;
