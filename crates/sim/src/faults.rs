//! The fault selection shared by both modes: `--faults none|all|<name>,<name>…`.

use std::fmt;
use std::str::FromStr;

/// Which faults a run injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Faults {
    /// Links between chosen peers are cut and healed.
    pub partition: bool,
    /// A peer is killed abruptly and restarted from its stored state (volatile state lost).
    pub restart: bool,
    /// A peer goes offline (cut from everyone, or shut down cleanly) and comes back.
    pub offline: bool,
    /// A new device joins mid-run and catches up from nothing.
    pub join: bool,
    /// Devices' wall clocks disagree, and some step while running.
    pub skew: bool,
    /// Messages are lost, duplicated, reordered and delayed on the wire.
    pub lossy: bool,
    /// A device is stopped and brought back from an older copy of its files, as a user restores
    /// a backup (its generation file restored too, or kept, as the user guide says).
    pub restore: bool,
    /// A device's library file is wiped and it joins again under its identity.
    pub recreate: bool,
    /// Retention caps small enough that a device away for a while is left behind (log entries
    /// pruned, tombstones collected before it had them).
    pub retention: bool,
    /// A device's clock jumps far beyond the drift bound (a year ahead), it writes, and the
    /// clock jumps back.
    pub clock_jump: bool,
    /// A device stops reading its connections for a while without closing them (a hung process).
    pub stall: bool,
}

/// Every fault name `--faults` accepts, in the order reports list them.
pub const FAULT_NAMES: [&str; 11] = [
    "partition",
    "restart",
    "offline",
    "join",
    "skew",
    "lossy",
    "restore",
    "recreate",
    "retention",
    "clock-jump",
    "stall",
];

impl Faults {
    /// Every fault.
    pub const ALL: Faults = Faults {
        partition: true,
        restart: true,
        offline: true,
        join: true,
        skew: true,
        lossy: true,
        restore: true,
        recreate: true,
        retention: true,
        clock_jump: true,
        stall: true,
    };

    /// The faults `--faults all` means in the deterministic mode: `recreate` is modelled
    /// (`--faults recreate` runs it) but stays out of `all` until its rare failures are settled
    /// (`docs/simulator.md`).
    pub const DETERMINISTIC: Faults = Faults { recreate: false, ..Faults::ALL };

    /// These faults as the deterministic mode runs them.
    pub fn deterministic_part(self) -> Faults {
        Faults { recreate: self.recreate && self != Faults::ALL, ..self }
    }

    fn flag(&mut self, name: &str) -> Option<&mut bool> {
        match name {
            "partition" => Some(&mut self.partition),
            "restart" => Some(&mut self.restart),
            "offline" => Some(&mut self.offline),
            "join" => Some(&mut self.join),
            "skew" => Some(&mut self.skew),
            "lossy" => Some(&mut self.lossy),
            "restore" => Some(&mut self.restore),
            "recreate" => Some(&mut self.recreate),
            "retention" => Some(&mut self.retention),
            "clock-jump" => Some(&mut self.clock_jump),
            "stall" => Some(&mut self.stall),
            _ => None,
        }
    }

    /// The names of the selected faults.
    pub fn names(&self) -> Vec<&'static str> {
        let selected = [
            self.partition,
            self.restart,
            self.offline,
            self.join,
            self.skew,
            self.lossy,
            self.restore,
            self.recreate,
            self.retention,
            self.clock_jump,
            self.stall,
        ];
        FAULT_NAMES.iter().zip(selected).filter(|(_, on)| *on).map(|(name, _)| *name).collect()
    }
}

impl FromStr for Faults {
    type Err = String;

    /// `none`, `all`, or a comma-separated list of fault names.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut faults = Faults::default();
        for name in text.split(',').map(str::trim) {
            match name {
                "none" => {}
                "all" => faults = Faults::ALL,
                _ => match faults.flag(name) {
                    Some(flag) => *flag = true,
                    None => {
                        return Err(format!(
                            "unknown fault {name:?}; expected none, all or a list of {}",
                            FAULT_NAMES.join(", ")
                        ));
                    }
                },
            }
        }
        Ok(faults)
    }
}

impl fmt::Display for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = self.names();
        if names.is_empty() { f.write_str("none") } else { f.write_str(&names.join(",")) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_none_and_all_and_refuses_unknown_names() {
        assert_eq!("none".parse::<Faults>(), Ok(Faults::default()));
        assert_eq!("all".parse::<Faults>(), Ok(Faults::ALL));
        let two: Faults = "partition, skew".parse().unwrap();
        assert_eq!(two, Faults { partition: true, skew: true, ..Faults::default() });
        assert_eq!(two.to_string(), "partition,skew");
        assert_eq!(
            Faults::ALL.to_string(),
            "partition,restart,offline,join,skew,lossy,restore,recreate,retention,clock-jump,stall"
        );
        assert_eq!(Faults::ALL.deterministic_part(), Faults::DETERMINISTIC);
        let jump: Faults = "clock-jump,stall".parse().unwrap();
        assert!(jump.clock_jump && jump.stall && !jump.restore);
        assert!("partition,meteor".parse::<Faults>().unwrap_err().contains("meteor"));
        assert_eq!(Faults::default().to_string(), "none");
    }
}
