//! The store's conformance on a real PostgreSQL (`support/postgres.rs`).

mod support;

use edgesync_hub::store::{conformance, Postgres, Store};
use support::postgres::Server;

fn store(server: &Server, db: &str) -> Store {
    Store::new(Box::new(Postgres::connect(&server.database(db)).unwrap())).unwrap()
}

#[test]
fn the_store_does_on_postgresql_what_it_does_on_sqlite() {
    let server = support::postgres::server();
    conformance::events_are_kept_once_and_gaps_found_and_filled(&mut store(&server, "a"));
    conformance::an_older_document_never_replaces_a_newer_one(&mut store(&server, "b"));
    conformance::the_overview_puts_failing_and_silent_nodes_first(&mut store(&server, "c"));
    conformance::app_views_carry_the_nodes_labels(&mut store(&server, "d"));
    conformance::apps_are_known_from_the_node_document_until_their_own_arrives(&mut store(
        &server, "e",
    ));
    conformance::rollouts_are_kept_and_replaced(&mut store(&server, "f"));
    conformance::messages_received_together_are_recorded_as_one_by_one(&mut store(&server, "g"));
    conformance::a_lease_has_one_holder_until_it_runs_out(&mut store(&server, "h"));
}
