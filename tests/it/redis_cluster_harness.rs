//! The Redis Cluster harness itself: the private clusters that cluster fault tests start
//! (`RedisCluster`), and the shared cluster scripts/test starts (`REDIS_CLUSTER_URLS`).

use crate::common::*;

fn connect(port: u16) -> redis::Connection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .expect("a valid URL")
        .get_connection_with_timeout(WAIT)
        .unwrap_or_else(|err| panic!("connect to {port}: {err}"))
}

fn set(port: u16, key: &str, value: &str) {
    let () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query(&mut connect(port))
        .unwrap_or_else(|err| panic!("SET {key} on {port}: {err}"));
}

fn get(port: u16, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query(&mut connect(port))
        .unwrap_or_else(|err| panic!("GET {key} on {port}: {err}"))
}

fn cluster_info(port: u16) -> String {
    redis::cmd("CLUSTER")
        .arg("INFO")
        .query(&mut connect(port))
        .unwrap_or_else(|err| panic!("CLUSTER INFO on {port}: {err}"))
}

#[test]
fn a_private_cluster_serves_a_key_from_the_master_of_its_slot() {
    let cluster = RedisCluster::start(false);
    let masters = cluster.master_ports().to_vec();
    assert_eq!(masters.len(), 3);
    assert_eq!(cluster.replica_port(), None);
    assert_eq!(
        cluster.urls(),
        masters
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
    );
    for &port in &masters {
        assert!(cluster_info(port).contains("cluster_state:ok"), "{port}");
    }

    // Every master serves some slots, and the others send a client there (MOVED): the
    // slots are really split and the cluster agrees on who serves what.
    for &master in &masters {
        let key = cluster.key_served_by(master);
        assert_eq!(cluster.master_of_key(&key), master);
        set(master, &key, "value");
        assert_eq!(get(master, &key).as_deref(), Some("value"));
        for &other in masters.iter().filter(|port| **port != master) {
            let err = redis::cmd("GET")
                .arg(&key)
                .query::<Option<String>>(&mut connect(other))
                .expect_err("a node that does not serve the slot redirects");
            let address = format!("127.0.0.1:{master}");
            assert_eq!(
                err.redirect_node().map(|(node, _slot)| node),
                Some(address.as_str()),
                "{other} on {key}: {err}"
            );
        }
    }
}

#[test]
fn killing_the_master_of_a_key_promotes_the_replica() {
    let mut cluster = RedisCluster::start(true);
    let replica = cluster.replica_port().expect("a replica");
    let master = cluster.master_ports()[0];
    let key = cluster.key_served_by(master);
    // The write has reached the replica before its master dies. WAIT counts the replicas
    // that have its connection's last write, so it goes on the connection of the SET.
    let mut connection = connect(master);
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("before")
        .query(&mut connection)
        .expect("SET");
    let synced: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(WAIT.as_millis() as u64)
        .query(&mut connection)
        .expect("WAIT");
    assert_eq!(synced, 1, "the replica acknowledged the write");

    cluster.kill(master);
    cluster.wait_failover(master);

    assert_eq!(cluster.master_of_key(&key), replica);
    assert_eq!(get(replica, &key).as_deref(), Some("before"));
    set(replica, &key, "after");
    assert_eq!(get(replica, &key).as_deref(), Some("after"));
    for &port in &cluster.master_ports()[1..] {
        assert!(cluster_info(port).contains("cluster_state:ok"), "{port}");
    }
}

#[test]
fn restart_all_empty_gives_an_empty_healthy_cluster_on_the_same_ports() {
    let mut cluster = RedisCluster::start(true);
    let urls = cluster.urls();
    let replica = cluster.replica_port().expect("a replica");
    let masters = cluster.master_ports().to_vec();
    let keys: Vec<String> = masters
        .iter()
        .map(|&master| {
            let key = cluster.key_served_by(master);
            set(master, &key, "old");
            key
        })
        .collect();
    // A node that is already dead is started again too.
    cluster.kill(masters[1]);

    cluster.restart_all_empty();

    assert_eq!(cluster.urls(), urls);
    assert_eq!(cluster.replica_port(), Some(replica));
    for port in masters.iter().copied().chain([replica]) {
        assert!(cluster_info(port).contains("cluster_state:ok"), "{port}");
        let keys_left: i64 = redis::cmd("DBSIZE")
            .query(&mut connect(port))
            .expect("DBSIZE");
        assert_eq!(keys_left, 0, "{port} is empty");
    }
    for key in &keys {
        let master = cluster.master_of_key(key);
        assert_eq!(get(master, key), None);
        set(master, key, "new");
        assert_eq!(get(master, key).as_deref(), Some("new"));
    }
    // The replica follows the first master again, so failover tests can run after a restart.
    cluster.kill(masters[0]);
    cluster.wait_failover(masters[0]);
}

#[test]
fn the_shared_cluster_from_scripts_test_answers() {
    let urls = std::env::var("REDIS_CLUSTER_URLS")
        .ok()
        .filter(|urls| !urls.trim().is_empty())
        .unwrap_or_else(|| {
            panic!(
                "REDIS_CLUSTER_URLS is not set: run the tests with scripts/test, which starts a \
             local Redis Cluster and sets it (or set it to a cluster's comma-separated seed URLs)"
            )
        });
    for url in urls.split(',').map(str::trim) {
        let mut connection = redis::Client::open(url)
            .unwrap_or_else(|err| panic!("REDIS_CLUSTER_URLS has {url:?}: {err}"))
            .get_connection_with_timeout(WAIT)
            .unwrap_or_else(|err| panic!("connect to {url}: {err}"));
        let pong: String = redis::cmd("PING")
            .query(&mut connection)
            .unwrap_or_else(|err| panic!("PING {url}: {err}"));
        assert_eq!(pong, "PONG", "{url}");
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query(&mut connection)
            .unwrap_or_else(|err| panic!("CLUSTER INFO on {url}: {err}"));
        assert!(
            info.contains("cluster_state:ok"),
            "{url} is not a healthy cluster node:\n{info}"
        );
    }
}
