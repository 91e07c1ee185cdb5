//! The forwarding decision of the virtual Ethernet switch (`kernel/user/netsw`), without I/O:
//! a bounded table of learned MAC addresses and, for each frame, the ports it goes to. A
//! source address is learned for the port it came from (never a multicast one); a frame for a
//! learned address goes to that port only (and nowhere if that is the port it came from); a
//! broadcast, multicast or unknown destination goes to every other port. The table holds at
//! most its capacity, forgetting the oldest entry first, so that a guest sending from ever new
//! addresses cannot grow it.

use alloc::vec::Vec;

/// An Ethernet address.
pub type Mac = [u8; 6];

/// The learned addresses.
pub struct MacTable {
    entries: Vec<(Mac, usize)>,
    capacity: usize,
}

/// Where a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destinations {
    /// To this port only.
    One(usize),
    /// To every port but this one (the one it came from).
    AllBut(usize),
    /// Nowhere (too short to be a frame, or for the port it came from).
    None,
}

impl MacTable {
    /// An empty table of at most `capacity` entries.
    pub fn new(capacity: usize) -> MacTable {
        MacTable {
            entries: Vec::new(),
            capacity: capacity.max(1),
        }
    }

    /// The number of learned addresses.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is learned.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The port `mac` was learned on.
    pub fn lookup(&self, mac: &Mac) -> Option<usize> {
        self.entries.iter().find(|(m, _)| m == mac).map(|&(_, p)| p)
    }

    /// Learn that `mac` is at `port`.
    pub fn learn(&mut self, mac: Mac, port: usize) {
        if mac[0] & 1 != 0 {
            return;
        }
        if let Some(entry) = self.entries.iter_mut().find(|(m, _)| *m == mac) {
            entry.1 = port;
            return;
        }
        if self.entries.len() >= self.capacity {
            self.entries.remove(0);
        }
        self.entries.push((mac, port));
    }

    /// Forget what was learned at `port` (a new guest is there).
    pub fn forget_port(&mut self, port: usize) {
        self.entries.retain(|&(_, p)| p != port);
    }

    /// Learn the source of `frame`, which came from port `from`, and say where it goes.
    pub fn forward(&mut self, frame: &[u8], from: usize) -> Destinations {
        if frame.len() < 14 {
            return Destinations::None;
        }
        let destination: Mac = frame[..6].try_into().expect("14 bytes at least");
        let source: Mac = frame[6..12].try_into().expect("14 bytes at least");
        self.learn(source, from);
        match self.lookup(&destination) {
            _ if destination[0] & 1 != 0 => Destinations::AllBut(from),
            Some(port) if port == from => Destinations::None,
            Some(port) => Destinations::One(port),
            None => Destinations::AllBut(from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(destination: Mac, source: Mac) -> Vec<u8> {
        let mut f = Vec::from(destination);
        f.extend_from_slice(&source);
        f.extend_from_slice(&[0x08, 0x00, 1, 2, 3]);
        f
    }

    const A: Mac = [2, 0, 0, 0, 0, 1];
    const B: Mac = [2, 0, 0, 0, 0, 2];
    const BROADCAST: Mac = [0xff; 6];

    #[test]
    fn unknown_and_broadcast_flood_known_go_to_one_port() {
        let mut t = MacTable::new(16);
        assert_eq!(t.forward(&frame(B, A), 0), Destinations::AllBut(0));
        assert_eq!(t.lookup(&A), Some(0));
        assert_eq!(t.forward(&frame(A, B), 1), Destinations::One(0));
        assert_eq!(t.forward(&frame(B, A), 0), Destinations::One(1));
        assert_eq!(t.forward(&frame(BROADCAST, A), 0), Destinations::AllBut(0));
        // A frame for an address on its own port goes nowhere.
        assert_eq!(t.forward(&frame(A, A), 0), Destinations::None);
    }

    #[test]
    fn multicast_sources_are_not_learned_and_short_frames_go_nowhere() {
        let mut t = MacTable::new(16);
        let multicast = [0x01, 0, 0x5e, 0, 0, 1];
        t.forward(&frame(A, multicast), 3);
        assert_eq!(t.lookup(&multicast), None);
        assert_eq!(t.forward(&[0u8; 13], 0), Destinations::None);
        assert!(t.is_empty());
    }

    #[test]
    fn the_table_is_bounded_and_moves_and_forgets() {
        let mut t = MacTable::new(4);
        for i in 0..100u8 {
            t.learn([2, 0, 0, 0, 1, i], 1);
        }
        assert_eq!(t.len(), 4);
        assert_eq!(t.lookup(&[2, 0, 0, 0, 1, 99]), Some(1));
        assert_eq!(t.lookup(&[2, 0, 0, 0, 1, 0]), None);
        t.learn([2, 0, 0, 0, 1, 99], 2);
        assert_eq!(t.lookup(&[2, 0, 0, 0, 1, 99]), Some(2));
        t.forget_port(2);
        assert_eq!(t.lookup(&[2, 0, 0, 0, 1, 99]), None);
        assert_eq!(t.len(), 3);
    }
}
