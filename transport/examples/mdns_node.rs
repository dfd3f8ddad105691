//! A transport node that finds one other member by mDNS, for the network-namespace test.
//!
//! `mdns_node SEED_HEX OTHER_SEED_HEX SECONDS`: starts a node whose device keys come from
//! SEED_HEX (signing and wrapping seeds alike, test use only), allows the device made from
//! OTHER_SEED_HEX, and exits 0 once connected to it, 1 after SECONDS.

use std::time::Duration;

use meshsync_crdt::DeviceKeys;
use meshsync_transport::{Config, Transport};
use zeroize::Zeroizing;

fn keys(hex: &str) -> DeviceKeys {
    let bytes = data_encoding::HEXLOWER
        .decode(hex.as_bytes())
        .expect("hex seed");
    let seed: [u8; 32] = bytes.try_into().expect("32-byte seed");
    DeviceKeys::from_seeds(Zeroizing::new(seed), Zeroizing::new(seed))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (me, other, seconds) = (
        keys(&args[1]),
        keys(&args[2]),
        args[3].parse::<u64>().unwrap_or(20),
    );
    let mut config = Config::tcp_and_quic(me.libp2p_keypair(), "0.0.0.0");
    config.mdns = true;
    config.peer_exchange = false;
    let transport = Transport::start(config).expect("transport starts");
    let other = other.device_id().to_peer_id();
    transport.set_allowed([other]).await;
    if transport
        .wait_connected(other, Duration::from_secs(seconds))
        .await
    {
        println!("connected to {other} found by mDNS");
    } else {
        println!("no connection to {other}");
        std::process::exit(1);
    }
    // Stay a moment so the other side sees the connection too.
    tokio::time::sleep(Duration::from_secs(2)).await;
}
