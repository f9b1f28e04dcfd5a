//! Presence: joins, states and leaves announced once each to the listeners on every
//! instance, the presence view, and what lapses (presence TTLs, state expiries) removed
//! and announced exactly once however many instances sweep.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::harness::{state_change, Case, Instance};
use crate::backend::{Backend, MetadataOf, MetadataWrite, PresenceChange, PresenceView, Topic};
use crate::merge::MergeStrategy;

/// A presence TTL that outlives every case.
const LONG: Duration = Duration::from_secs(60);
/// A TTL or expiry that lapses within a case.
const SHORT: Duration = Duration::from_millis(300);
/// How long a case waits for [`SHORT`] to lapse: the only sleeps of the suite, since
/// nothing can be awaited for time to pass.
const LAPSE: Duration = Duration::from_millis(700);

const ROOM: &str = "lobby";

fn presence_topic() -> Topic {
    Topic::Presence(Arc::from(ROOM))
}

async fn view<B: Backend>(from: &Instance<B>) -> PresenceView {
    from.ok("presence(\"lobby\")", from.backend.presence(ROOM))
        .await
}

async fn set_state<B: Backend>(
    from: &Instance<B>,
    connection_id: &str,
    state: Option<&Value>,
    expire_after: Option<Duration>,
    silent: bool,
) -> bool {
    from.ok(
        format!("set_presence_state({connection_id:?}, {state:?}, silent: {silent})"),
        from.backend
            .set_presence_state(connection_id, ROOM, state, expire_after, silent),
    )
    .await
}

/// Expects one presence change on both instances (both listen).
async fn announced<B: Backend>(
    case: &Case<B>,
    connection_id: &str,
    change: PresenceChange,
    what: &str,
) {
    for instance in case.both() {
        instance
            .expect_presence(ROOM, connection_id, change.clone(), what)
            .await;
    }
}

/// Runs `sweep` on both instances at once.
async fn sweep_on_both<B: Backend>(case: &Case<B>) {
    let (a, b) = (&case.a, &case.b);
    tokio::join!(
        a.ok("sweep", a.backend.sweep()),
        b.ok("sweep", b.backend.sweep())
    );
}

/// Joins with a TTL announce once; states are announced unless silent, a cleared state
/// once; a connection that is not present has no state; a leave is announced.
pub(super) async fn announcements<B: Backend>(case: &Case<B>) {
    let (a, b) = (&case.a, &case.b);
    case.listen_on_both(&presence_topic()).await;
    a.register("conn-1").await;
    b.register("conn-2").await;

    a.join("conn-1", ROOM, Some(LONG)).await;
    announced(case, "conn-1", PresenceChange::Join, "the join of conn-1").await;
    case.quiet(a, "a join with a TTL").await;
    a.join("conn-1", ROOM, Some(LONG)).await;
    case.quiet(
        a,
        "a second join of a present connection (not announced again)",
    )
    .await;
    b.join("conn-2", ROOM, None).await;
    case.quiet(b, "a join without a TTL (not presence)").await;

    let typing = json!({ "typing": true });
    for (connection_id, from) in [("conn-2", b), ("conn-unknown", a)] {
        let stored = set_state(from, connection_id, Some(&typing), None, false).await;
        from.check(
            !stored,
            format!("set_presence_state of {connection_id:?}, not present, returned true"),
        );
        let cleared = set_state(from, connection_id, None, None, false).await;
        from.check(
            !cleared,
            format!("clearing the state of {connection_id:?}, not present, returned true"),
        );
    }
    case.quiet(b, "state writes of connections that are not present")
        .await;

    let stored = set_state(a, "conn-1", Some(&typing), None, false).await;
    a.check(
        stored,
        "set_presence_state of a present connection returned false",
    );
    announced(case, "conn-1", state_change(&typing), "the state of conn-1").await;
    case.quiet(a, "a state write").await;

    let idle = json!({ "typing": false, "since": [1, 2] });
    let stored = set_state(a, "conn-1", Some(&idle), None, true).await;
    a.check(stored, "a silent set_presence_state returned false");
    case.quiet(a, "a silent state write (not announced)").await;
    for instance in case.both() {
        let seen = view(instance).await;
        instance.same(
            seen.states,
            vec![("conn-1".to_owned(), idle.clone())],
            "the presence states after a silent write",
        );
    }

    let cleared = set_state(a, "conn-1", None, None, false).await;
    a.check(
        cleared,
        "clearing the state of a present connection returned false",
    );
    announced(
        case,
        "conn-1",
        PresenceChange::State(None),
        "the cleared state",
    )
    .await;
    case.quiet(a, "a cleared state (announced once)").await;
    let cleared = set_state(a, "conn-1", None, None, false).await;
    a.check(
        cleared,
        "clearing an absent state of a present connection returned false",
    );
    case.quiet(a, "clearing a state that is not there (not announced)")
        .await;

    let left = a
        .ok(
            "leave_room(\"conn-1\")",
            a.backend.leave_room("conn-1", ROOM),
        )
        .await;
    a.check(left, "leave_room of a present member returned false");
    announced(case, "conn-1", PresenceChange::Leave, "the leave of conn-1").await;
    let left = b
        .ok(
            "leave_room(\"conn-2\")",
            b.backend.leave_room("conn-2", ROOM),
        )
        .await;
    b.check(left, "leave_room of a member returned false");
    case.quiet(
        a,
        "a leave (announced once), and a leave without presence (not announced)",
    )
    .await;
    for instance in case.both() {
        let seen = view(instance).await;
        instance.same(
            seen,
            PresenceView::default(),
            "the presence after both left",
        );
    }
}

/// The presence view: present connections in join order with their metadata (members
/// without presence left out), and their states.
pub(super) async fn presence_view<B: Backend>(case: &Case<B>) {
    let (a, b) = (&case.a, &case.b);
    case.listen_on_both(&presence_topic()).await;
    a.register("conn-1").await;
    b.register("conn-2").await;
    a.register("conn-3").await;
    let metadata = json!({ "name": "grace" });
    let write = MetadataWrite::new(
        metadata.clone(),
        MergeStrategy::Replace,
        1024,
        "conformance metadata".to_owned(),
    );
    let written = a
        .ok(
            "set_metadata of conn-2",
            a.backend
                .set_metadata(MetadataOf::Connection("conn-2"), &write),
        )
        .await;
    a.check(
        written,
        "set_metadata of a registered connection returned false",
    );

    a.join("conn-3", ROOM, Some(LONG)).await;
    announced(case, "conn-3", PresenceChange::Join, "the join of conn-3").await;
    a.join("conn-1", ROOM, None).await;
    b.join("conn-2", ROOM, Some(LONG)).await;
    announced(case, "conn-2", PresenceChange::Join, "the join of conn-2").await;
    let mood = json!({ "mood": "calm" });
    let stored = set_state(b, "conn-2", Some(&mood), None, false).await;
    b.check(
        stored,
        "set_presence_state of a present connection returned false",
    );
    announced(case, "conn-2", state_change(&mood), "the state of conn-2").await;

    for instance in case.both() {
        let seen = view(instance).await;
        instance.same(
            seen,
            PresenceView {
                present: vec![
                    ("conn-3".to_owned(), Value::Null),
                    ("conn-2".to_owned(), metadata.clone()),
                ],
                states: vec![("conn-2".to_owned(), mood.clone())],
            },
            "presence(): present connections in join order with metadata, and states",
        );
        let elsewhere = instance
            .ok(
                "presence of an unknown room",
                instance.backend.presence("nowhere"),
            )
            .await;
        instance.same(
            elsewhere,
            PresenceView::default(),
            "the presence of an unknown room",
        );
    }
    case.quiet(a, "the presence reads").await;
}

/// A lapsed TTL is swept by both instances at once and announced exactly once; a refresh
/// keeps a presence past its first TTL, and makes a lapsed one present (and announced)
/// again; a refresh where the connection is no member does nothing.
pub(super) async fn ttl<B: Backend>(case: &Case<B>) {
    let (a, b) = (&case.a, &case.b);
    case.listen_on_both(&presence_topic()).await;
    a.register("conn-lapses").await;
    b.register("conn-refreshed").await;
    a.join("conn-lapses", ROOM, Some(SHORT)).await;
    announced(case, "conn-lapses", PresenceChange::Join, "a join").await;
    b.join("conn-refreshed", ROOM, Some(SHORT)).await;
    announced(case, "conn-refreshed", PresenceChange::Join, "a join").await;
    let refresh = [(Arc::from("conn-refreshed"), vec![(Arc::from(ROOM), LONG)])];
    b.ok("refresh_presence", b.backend.refresh_presence(&refresh))
        .await;
    case.quiet(b, "a refresh of a present connection (not announced)")
        .await;

    tokio::time::sleep(LAPSE).await;
    sweep_on_both(case).await;
    announced(
        case,
        "conn-lapses",
        PresenceChange::Leave,
        "the leave of the lapsed presence",
    )
    .await;
    case.quiet(
        a,
        "the sweeps on both instances (one leave, none for the refreshed)",
    )
    .await;
    sweep_on_both(case).await;
    case.quiet(b, "more sweeps with nothing lapsed").await;

    for instance in case.both() {
        let seen = view(instance).await;
        instance.same(
            seen.present,
            vec![("conn-refreshed".to_owned(), Value::Null)],
            "the present connections after the sweep",
        );
        let members = instance
            .ok("room_members", instance.backend.room_members(ROOM))
            .await;
        instance.same(
            members,
            vec!["conn-lapses".to_owned(), "conn-refreshed".to_owned()],
            "the members after a lapse (presence lapses, membership stays)",
        );
    }

    let refresh = [(
        Arc::from("conn-lapses"),
        vec![(Arc::from(ROOM), LONG), (Arc::from("not-a-member"), LONG)],
    )];
    a.ok("refresh_presence", a.backend.refresh_presence(&refresh))
        .await;
    announced(
        case,
        "conn-lapses",
        PresenceChange::Join,
        "the join of a lapsed presence refreshed",
    )
    .await;
    case.quiet(
        a,
        "a refresh (a join where it lapsed, nothing where no member)",
    )
    .await;
    let elsewhere = a
        .ok(
            "presence of a room refreshed without membership",
            a.backend.presence("not-a-member"),
        )
        .await;
    a.same(
        elsewhere.present,
        Vec::new(),
        "a refresh where the connection is no member makes nothing present",
    );
}

/// A state's `expire_after` lapses: swept by both instances at once, announced exactly
/// once as `State(None)`, while the presence stays; a state replaced without an expiry
/// keeps.
pub(super) async fn state_expiry<B: Backend>(case: &Case<B>) {
    let (a, b) = (&case.a, &case.b);
    case.listen_on_both(&presence_topic()).await;
    a.register("conn-1").await;
    b.register("conn-2").await;
    a.join("conn-1", ROOM, Some(LONG)).await;
    announced(case, "conn-1", PresenceChange::Join, "a join").await;
    b.join("conn-2", ROOM, Some(LONG)).await;
    announced(case, "conn-2", PresenceChange::Join, "a join").await;

    let typing = json!({ "typing": true });
    let stored = set_state(a, "conn-1", Some(&typing), Some(SHORT), false).await;
    a.check(
        stored,
        "set_presence_state with expire_after returned false",
    );
    announced(
        case,
        "conn-1",
        state_change(&typing),
        "a state that expires",
    )
    .await;
    let kept = json!({ "status": "away" });
    let stored = set_state(b, "conn-2", Some(&typing), Some(SHORT), true).await;
    b.check(stored, "set_presence_state returned false");
    let stored = set_state(b, "conn-2", Some(&kept), None, false).await;
    b.check(stored, "set_presence_state returned false");
    announced(
        case,
        "conn-2",
        state_change(&kept),
        "a state replaced without expiry",
    )
    .await;

    tokio::time::sleep(LAPSE).await;
    sweep_on_both(case).await;
    announced(
        case,
        "conn-1",
        PresenceChange::State(None),
        "the expiry of conn-1's state",
    )
    .await;
    case.quiet(
        a,
        "the sweeps on both instances (one expiry, none for the replaced state)",
    )
    .await;
    for instance in case.both() {
        let seen = view(instance).await;
        instance.same(
            seen,
            PresenceView {
                present: vec![
                    ("conn-1".to_owned(), Value::Null),
                    ("conn-2".to_owned(), Value::Null),
                ],
                states: vec![("conn-2".to_owned(), kept.clone())],
            },
            "the presence after a state expired (still present, without the state)",
        );
    }
}
