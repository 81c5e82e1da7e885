//! `--huge-pages`: huge pages for the engines' tables and the UMEMs, and what came of it.
//!
//! Never a reason to fail the start: whatever the kernel refuses runs on normal pages, and
//! the start-up log line and the stats file (`huge_pages.*`) say how much memory huge pages
//! back (docs/deployment.md, "Huge pages").

use std::fmt::Write as _;

use xlb_afxdp::{
    huge::{self, Report, Thp},
    umem::{UmemBacking, UmemMemory},
};
use xlb_engine::Engine;

/// What xlbd's big memory runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HugePages {
    /// `--huge-pages auto` (else off: nothing was asked).
    pub enabled: bool,
    /// The kernel's THP mode for anonymous memory.
    pub thp: Thp,
    /// Every engine's tables: bytes, advised, on huge pages at start.
    pub tables: Report,
    /// Every UMEM, in worker order.
    pub umems: Vec<UmemMemory>,
    /// The first refusal, when the kernel refused some advice.
    pub refused: Option<String>,
}

impl HugePages {
    pub fn new(enabled: bool) -> HugePages {
        HugePages {
            enabled,
            thp: Thp::host(),
            tables: Report::default(),
            umems: Vec::new(),
            refused: None,
        }
    }

    /// Advises `engine`'s tables (with `--huge-pages auto`) and counts them either way.
    pub fn add_engine(&mut self, engine: &Engine) {
        let ranges: Vec<(usize, usize)> = engine
            .memory_regions()
            .map(|r| (r.start as usize, r.len))
            .collect();
        if !self.enabled {
            self.tables.bytes += ranges.iter().map(|r| r.1 as u64).sum::<u64>();
            return;
        }
        let (report, err) = huge::advise_all(&ranges);
        self.tables.add(&report);
        if let Some(e) = err {
            self.refused.get_or_insert_with(|| e.to_string());
        }
    }

    pub fn add_umems(&mut self, umems: &[UmemMemory]) {
        self.umems.extend_from_slice(umems);
    }

    fn umem_bytes(&self) -> (u64, u64) {
        (self.umems.iter()).fold((0, 0), |(b, h), u| (b + u.bytes, h + u.huge))
    }

    fn umems_backed(&self, backing: UmemBacking) -> u64 {
        self.umems.iter().filter(|u| u.backing == backing).count() as u64
    }

    /// The start-up log line.
    pub fn line(&self) -> String {
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        if !self.enabled {
            return format!(
                "huge pages off (--huge-pages off): engine tables {:.1} MiB and UMEMs {:.1} MiB \
                 on normal pages",
                mib(self.tables.bytes),
                mib(self.umem_bytes().0)
            );
        }
        let (umem, umem_huge) = self.umem_bytes();
        let mut s = format!(
            "huge pages (THP {}): engine tables {:.1} MiB, {:.1} MiB advised, {:.1} MiB on huge \
             pages; UMEMs {:.1} MiB, {:.1} MiB on huge pages ({} from the hugetlb pool, {} on THP, \
             {} on normal pages)",
            self.thp,
            mib(self.tables.bytes),
            mib(self.tables.advised),
            mib(self.tables.huge),
            mib(umem),
            mib(umem_huge),
            self.umems_backed(UmemBacking::Hugetlb),
            self.umems_backed(UmemBacking::Thp),
            self.umems_backed(UmemBacking::Pages),
        );
        if let Some(e) = &self.refused {
            let _ = write!(s, "; the kernel refused advice: {e}");
        }
        if self.umems_backed(UmemBacking::Pages) > 0 {
            s.push_str("; reserve huge pages (vm.nr_hugepages) for the UMEMs");
        }
        s
    }

    /// `huge_pages.*` lines of the stats file; `anon_huge` is the process's AnonHugePages now.
    pub fn to_kv(&self, anon_huge: Option<u64>) -> String {
        let mut s = String::new();
        let mut kv = |k: &str, v: u64| {
            let _ = writeln!(s, "huge_pages.{k}={v}");
        };
        let (umem, umem_huge) = self.umem_bytes();
        kv("enabled", u64::from(self.enabled));
        kv("tables_bytes", self.tables.bytes);
        kv("tables_advised_bytes", self.tables.advised);
        kv("tables_huge_bytes", self.tables.huge);
        kv("umem_bytes", umem);
        kv("umem_huge_bytes", umem_huge);
        kv("umems_hugetlb", self.umems_backed(UmemBacking::Hugetlb));
        kv("umems_thp", self.umems_backed(UmemBacking::Thp));
        kv("umems_pages", self.umems_backed(UmemBacking::Pages));
        if let Some(a) = anon_huge {
            kv("anon_huge_bytes", a);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use xlb_engine::{ruleset::Timers, EngineConfig, RuleSet};

    use super::*;

    fn engine(capacity: u32) -> Engine {
        let cfg = EngineConfig {
            flow_capacity: capacity,
            ..EngineConfig::default()
        };
        Engine::new(cfg, Arc::new(RuleSet::empty(1, Timers::default())), 0)
    }

    #[test]
    fn an_engine_of_a_million_flows_gets_its_tables_advised() {
        let e = engine(1 << 20);
        let mut h = HugePages::new(true);
        h.add_engine(&e);
        h.add_umems(&[UmemMemory {
            backing: UmemBacking::Pages,
            bytes: 8 << 20,
            huge: 0,
        }]);
        println!("{}", h.line());
        assert!(h.tables.bytes >= e.table_bytes() as u64 - 8192);
        // Every table but the bitmaps spans many huge pages: all but the partial huge pages
        // at the ends of each is advised.
        assert!(h.tables.advised * 100 >= h.tables.bytes * 90, "{h:?}");
        if matches!(h.thp, Thp::Madvise | Thp::Always) {
            assert!(h.tables.huge > 0, "{h:?}");
        }
        let kv = h.to_kv(Some(4096));
        assert!(kv.contains("huge_pages.enabled=1\n"), "{kv}");
        assert!(kv.contains(&format!("huge_pages.tables_bytes={}\n", h.tables.bytes)));
        assert!(kv.contains("huge_pages.umems_pages=1\n"), "{kv}");
        assert!(kv.contains("huge_pages.anon_huge_bytes=4096\n"), "{kv}");
        assert!(h.line().contains("reserve huge pages"), "{}", h.line());
    }

    #[test]
    fn off_advises_nothing_and_says_so() {
        let e = engine(1 << 16);
        let mut h = HugePages::new(false);
        h.add_engine(&e);
        assert_eq!((h.tables.advised, h.tables.huge), (0, 0));
        assert!(h.tables.bytes > 0);
        assert!(h.line().starts_with("huge pages off"), "{}", h.line());
        assert!(h.to_kv(None).contains("huge_pages.enabled=0\n"));
    }
}
