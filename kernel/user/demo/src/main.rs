//! The demo task. Started as `pong` it serves requests on its first thread: it answers each
//! call with the number doubled, and stops on a `quit` message. Started as `ping` (with
//! `peer=pong`) it calls pong a few times, prints the answers and sends `quit`.
#![no_std]
#![no_main]

use l4::abi::{slots, MessageTag, Timeouts};
use l4::{ipc, println};

const LABEL_DOUBLE: i32 = 1;
const LABEL_QUIT: i32 = 2;

fn pong() -> i64 {
    println!("[pong] waiting for requests");
    let mut message = ipc::wait(Timeouts::INFINITE);
    let mut served = 0;
    loop {
        let m = match message {
            Ok(m) => m,
            Err(e) => {
                println!("[pong] IPC error {e:?}");
                return 1;
            }
        };
        match m.tag.label() {
            LABEL_DOUBLE => {
                served += 1;
                println!(
                    "[pong] request {} from badge {:#x}: {} -> {}",
                    served,
                    m.badge,
                    m.word(0),
                    m.word(0) * 2
                );
                message = ipc::reply_wait(
                    MessageTag::new(0, 1, 0),
                    &[m.word(0) * 2],
                    Timeouts::INFINITE,
                );
            }
            LABEL_QUIT => {
                println!("[pong] quit after {served} requests");
                return 0;
            }
            other => {
                println!("[pong] unknown label {other}");
                message = ipc::wait(Timeouts::INFINITE);
            }
        }
    }
}

fn ping() -> i64 {
    let mut value = 1u64;
    for round in 1..=5 {
        match ipc::call(
            slots::PEER,
            MessageTag::new(LABEL_DOUBLE, 1, 0),
            &[value],
            Timeouts::INFINITE,
        ) {
            Ok(reply) => {
                println!("[ping] round {round}: sent {value}, got {}", reply.word(0));
                value = reply.word(0);
            }
            Err(e) => {
                println!("[ping] call failed: {e:?}");
                return 1;
            }
        }
    }
    let _ = ipc::send(
        slots::PEER,
        MessageTag::new(LABEL_QUIT, 0, 0),
        &[],
        Timeouts::INFINITE,
    );
    println!("[ping] done");
    0
}

fn main() -> i64 {
    if l4::rt::arguments().split_whitespace().any(|w| w == "ping") {
        ping()
    } else {
        pong()
    }
}

l4::main!(main);
