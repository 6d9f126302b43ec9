//! Request planning: merge a device's registers into few reads.

use super::regmap::{Area, Register};

/// Planner knobs, per device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOptions {
    /// Largest read, in registers (bits for coil areas); capped at the protocol limit.
    pub max_registers: u16,
    /// Largest gap of unused registers read to join two ranges (0 = contiguous only).
    pub max_hole: u16,
    /// One request per register, for devices that reject multi-register reads.
    pub one_per_field: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            max_registers: 125,
            max_hole: 50,
            one_per_field: false,
        }
    }
}

/// Where a register's words sit inside a request's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Index into the register list given to [`plan`].
    pub register: usize,
    /// Offset of the first word from the request start.
    pub offset: u16,
}

/// One read request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    pub area: Area,
    pub start: u16,
    pub count: u16,
    pub fields: Vec<Field>,
}

impl ReadRequest {
    /// Registers read that no field uses (hole filling cost).
    pub fn unused(&self, regs: &[Register]) -> u32 {
        let used: u32 = self
            .fields
            .iter()
            .map(|f| u32::from(regs[f.register].words()))
            .sum();
        u32::from(self.count).saturating_sub(used)
    }
}

/// Plans the reads for one device. Registers larger than one request (long
/// strings) get a request of their own and are never split.
pub fn plan(regs: &[Register], opts: &PlanOptions) -> Vec<ReadRequest> {
    let mut order: Vec<usize> = (0..regs.len()).collect();
    order.sort_by_key(|&i| (regs[i].area, regs[i].address, regs[i].words()));
    let mut out: Vec<ReadRequest> = Vec::new();
    // exclusive end of the current request
    let mut cur_end: u32 = 0;
    for i in order {
        let r = &regs[i];
        let limit = u32::from(opts.max_registers.clamp(1, r.area.max_per_request()));
        let start = u32::from(r.address);
        let end = r.end();
        let joined = match out.last_mut() {
            Some(req) if !opts.one_per_field && req.area == r.area => {
                let req_start = u32::from(req.start);
                let gap = start.saturating_sub(cur_end);
                let new_end = end.max(cur_end);
                if gap <= u32::from(opts.max_hole) && new_end - req_start <= limit {
                    req.fields.push(Field {
                        register: i,
                        offset: (start - req_start) as u16,
                    });
                    cur_end = new_end;
                    req.count = (cur_end - req_start) as u16;
                    true
                } else {
                    false
                }
            }
            _ => false,
        };
        if !joined {
            out.push(ReadRequest {
                area: r.area,
                start: r.address,
                count: r.words(),
                fields: vec![Field {
                    register: i,
                    offset: 0,
                }],
            });
            cur_end = end;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::modbus::regmap::DataType;

    fn f32s(area: Area, addrs: &[u16]) -> Vec<Register> {
        addrs
            .iter()
            .map(|a| Register::new(&format!("r{a}"), area, *a, DataType::F32))
            .collect()
    }

    #[test]
    fn contiguous_registers_become_one_request() {
        let regs = f32s(Area::Input, &[0, 2, 4, 6]);
        let p = plan(&regs, &PlanOptions::default());
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].start, p[0].count), (0, 8));
        assert_eq!(
            p[0].fields.iter().map(|f| f.offset).collect::<Vec<_>>(),
            [0, 2, 4, 6]
        );
    }

    #[test]
    fn holes_are_filled_only_up_to_the_configured_size() {
        let regs = f32s(Area::Input, &[0, 12, 100]);
        let opts = PlanOptions {
            max_hole: 10,
            ..PlanOptions::default()
        };
        let p = plan(&regs, &opts);
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].start, p[0].count), (0, 14));
        assert_eq!(p[0].unused(&regs), 10);
        let strict = plan(
            &regs,
            &PlanOptions {
                max_hole: 0,
                ..opts
            },
        );
        assert_eq!(strict.len(), 3);
    }

    #[test]
    fn no_request_exceeds_125_registers() {
        let addrs: Vec<u16> = (0..200).map(|i| i * 2).collect();
        let regs = f32s(Area::Holding, &addrs);
        let p = plan(&regs, &PlanOptions::default());
        assert!(p.iter().all(|r| r.count <= 125));
        assert_eq!(p.iter().map(|r| r.fields.len()).sum::<usize>(), 200);
        // a 2-word value never straddles two requests
        assert_eq!(p[0].count, 124);
    }

    #[test]
    fn areas_are_never_mixed() {
        let mut regs = f32s(Area::Input, &[0]);
        regs.extend(f32s(Area::Holding, &[2]));
        assert_eq!(plan(&regs, &PlanOptions::default()).len(), 2);
    }

    #[test]
    fn one_request_per_field_switch_splits_everything() {
        let regs = f32s(Area::Input, &[0, 2, 4]);
        let p = plan(
            &regs,
            &PlanOptions {
                one_per_field: true,
                ..PlanOptions::default()
            },
        );
        assert_eq!(p.len(), 3);
        assert!(p.iter().all(|r| r.count == 2 && r.fields.len() == 1));
    }

    #[test]
    fn field_indexes_point_back_to_the_callers_order() {
        let regs = f32s(Area::Input, &[10, 0]);
        let p = plan(&regs, &PlanOptions::default());
        assert_eq!(p[0].start, 0);
        assert_eq!(
            p[0].fields[0],
            Field {
                register: 1,
                offset: 0
            }
        );
        assert_eq!(
            p[0].fields[1],
            Field {
                register: 0,
                offset: 10
            }
        );
    }
}
