//! Mode parameters (SPC-4 §7.5, SBC-3 §6.5): the caching, control and informational exceptions
//! pages, the MODE SENSE(6)/(10) headers and block descriptors, and MODE SELECT parsing.
//!
//! Changeable: WCE (caching) and D_SENSE (control). Everything else is fixed; MODE SELECT that
//! tries to change a fixed bit gets INVALID FIELD IN PARAMETER LIST.

use super::sense::{INVALID_FIELD_IN_PARAMETER_LIST, PARAMETER_LIST_LENGTH_ERROR, Sense};

pub mod page {
    pub const CACHING: u8 = 0x08;
    pub const CONTROL: u8 = 0x0a;
    pub const INFORMATIONAL_EXCEPTIONS: u8 = 0x1c;
    pub const ALL: u8 = 0x3f;
}

/// The page codes served, ascending (the order of MODE SENSE for page 3Fh).
pub const PAGES: [u8; 3] = [page::CACHING, page::CONTROL, page::INFORMATIONAL_EXCEPTIONS];

/// PC field of MODE SENSE (SPC-4 table 157).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageControl {
    Current,
    Changeable,
    Default,
    Saved,
}

impl PageControl {
    pub fn from_bits(pc: u8) -> Self {
        match pc & 3 {
            0 => PageControl::Current,
            1 => PageControl::Changeable,
            2 => PageControl::Default,
            _ => PageControl::Saved,
        }
    }
}

/// The changeable mode parameters of a logical unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModeParams {
    /// Caching page WCE (byte 2 bit 2).
    pub wce: bool,
    /// Control page D_SENSE (byte 2 bit 2): descriptor-format sense.
    pub d_sense: bool,
}

const CACHING_LEN: usize = 20;
const CACHING_WCE: u8 = 0x04;
const CONTROL_LEN: usize = 12;
const CONTROL_D_SENSE: u8 = 0x04;
const IE_LEN: usize = 12;

/// One page as MODE SENSE reports it for `pc` (`Saved` is the caller's decision: we report
/// SAVING PARAMETERS NOT SUPPORTED). `None` for a page we do not have.
pub fn page_bytes(code: u8, pc: PageControl, current: &ModeParams, default: &ModeParams) -> Option<Vec<u8>> {
    let p = match pc {
        PageControl::Default | PageControl::Saved => *default,
        _ => *current,
    };
    let changeable = pc == PageControl::Changeable;
    Some(match code {
        page::CACHING => {
            let mut b = vec![0u8; CACHING_LEN];
            b[0] = page::CACHING;
            b[1] = (CACHING_LEN - 2) as u8;
            if changeable || p.wce {
                b[2] = CACHING_WCE;
            }
            b
        }
        page::CONTROL => {
            let mut b = vec![0u8; CONTROL_LEN];
            b[0] = page::CONTROL;
            b[1] = (CONTROL_LEN - 2) as u8;
            if changeable {
                b[2] = CONTROL_D_SENSE;
            } else {
                if p.d_sense {
                    b[2] = CONTROL_D_SENSE;
                }
                // QUEUE ALGORITHM MODIFIER 1 (unrestricted reordering), QERR 00b.
                b[3] = 0x10;
                // BUSY TIMEOUT PERIOD: unlimited.
                b[8] = 0xff;
                b[9] = 0xff;
            }
            b
        }
        page::INFORMATIONAL_EXCEPTIONS => {
            let mut b = vec![0u8; IE_LEN];
            b[0] = page::INFORMATIONAL_EXCEPTIONS;
            b[1] = (IE_LEN - 2) as u8;
            b
        }
        _ => return None,
    })
}

/// MODE SENSE parameter data: header (6: SPC-4 table 453, 10: table 454), an optional short or
/// long block descriptor (SBC-3 §6.5.2), then `pages`.
pub fn mode_sense_data(
    ten: bool,
    write_protected: bool,
    block_descriptor: Option<(u64, u32)>,
    long_lba: bool,
    pages: &[u8],
) -> Vec<u8> {
    // DPOFUA (bit 4) always: DPO and FUA are honoured; WP bit 7.
    let device_specific = 0x10 | if write_protected { 0x80 } else { 0 };
    let mut bd = Vec::new();
    if let Some((blocks, block_len)) = block_descriptor {
        if long_lba {
            bd.extend_from_slice(&blocks.to_be_bytes());
            bd.extend_from_slice(&[0, 0, 0, 0]);
            bd.extend_from_slice(&block_len.to_be_bytes());
        } else {
            let n = u32::try_from(blocks).unwrap_or(u32::MAX);
            bd.extend_from_slice(&n.to_be_bytes());
            bd.push(0);
            bd.extend_from_slice(&block_len.to_be_bytes()[1..]);
        }
    }
    let mut b = Vec::with_capacity(8 + bd.len() + pages.len());
    if ten {
        b.extend_from_slice(&[
            0,
            0,
            0,
            device_specific,
            if long_lba && !bd.is_empty() { 1 } else { 0 },
            0,
        ]);
        b.extend_from_slice(&(bd.len() as u16).to_be_bytes());
    } else {
        b.extend_from_slice(&[0, 0, device_specific, bd.len() as u8]);
    }
    b.extend_from_slice(&bd);
    b.extend_from_slice(pages);
    if ten {
        let n = (b.len() - 2).min(usize::from(u16::MAX)) as u16;
        b[0..2].copy_from_slice(&n.to_be_bytes());
    } else {
        b[0] = (b.len() - 1).min(255) as u8;
    }
    b
}

/// Parses MODE SELECT parameter data and applies the pages to `params`. Only WCE and D_SENSE may
/// differ from `current`; any other difference (or an unknown page) is INVALID FIELD IN PARAMETER
/// LIST with a field pointer to the offending byte.
pub fn mode_select(ten: bool, data: &[u8], current: &ModeParams, default: &ModeParams) -> Result<ModeParams, Sense> {
    let header_len = if ten { 8 } else { 4 };
    if data.len() < header_len {
        return Err(Sense::from(PARAMETER_LIST_LENGTH_ERROR));
    }
    let bd_len = if ten {
        usize::from(u16::from_be_bytes([data[6], data[7]]))
    } else {
        usize::from(data[3])
    };
    let mut at = header_len + bd_len;
    if at > data.len() {
        return Err(Sense::from(PARAMETER_LIST_LENGTH_ERROR));
    }
    let mut out = *current;
    while at < data.len() {
        if at + 2 > data.len() {
            return Err(Sense::from(PARAMETER_LIST_LENGTH_ERROR));
        }
        let code = data[at] & 0x3f;
        if data[at] & 0x40 != 0 {
            // SPF: no subpages here.
            return Err(Sense::param_field(INVALID_FIELD_IN_PARAMETER_LIST, at as u16, Some(6)));
        }
        let len = usize::from(data[at + 1]) + 2;
        if at + len > data.len() {
            return Err(Sense::from(PARAMETER_LIST_LENGTH_ERROR));
        }
        let given = &data[at..at + len];
        let Some(cur) = page_bytes(code, PageControl::Current, current, default) else {
            return Err(Sense::param_field(INVALID_FIELD_IN_PARAMETER_LIST, at as u16, None));
        };
        let Some(mask) = page_bytes(code, PageControl::Changeable, current, default) else {
            return Err(Sense::param_field(INVALID_FIELD_IN_PARAMETER_LIST, at as u16, None));
        };
        if len != cur.len() {
            return Err(Sense::param_field(
                INVALID_FIELD_IN_PARAMETER_LIST,
                (at + 1) as u16,
                None,
            ));
        }
        // Byte 0 bit 7 (PS) is ignored on MODE SELECT.
        for i in 1..len {
            if (given[i] ^ cur[i]) & !mask[i] != 0 {
                return Err(Sense::param_field(
                    INVALID_FIELD_IN_PARAMETER_LIST,
                    (at + i) as u16,
                    None,
                ));
            }
        }
        match code {
            page::CACHING => out.wce = given[2] & CACHING_WCE != 0,
            page::CONTROL => out.d_sense = given[2] & CONTROL_D_SENSE != 0,
            _ => {}
        }
        at += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: ModeParams = ModeParams {
        wce: true,
        d_sense: false,
    };

    /// SBC-3 §6.5.5 caching page (WCE), SPC-4 §7.5.8 control page.
    #[test]
    fn pages_exact() {
        let c = page_bytes(page::CACHING, PageControl::Current, &P, &P).unwrap();
        assert_eq!(c, [0x08, 0x12, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let ctl = page_bytes(page::CONTROL, PageControl::Current, &P, &P).unwrap();
        assert_eq!(ctl, [0x0a, 0x0a, 0, 0x10, 0, 0, 0, 0, 0xff, 0xff, 0, 0]);
        let ch = page_bytes(page::CONTROL, PageControl::Changeable, &P, &P).unwrap();
        assert_eq!(ch, [0x0a, 0x0a, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let ie = page_bytes(page::INFORMATIONAL_EXCEPTIONS, PageControl::Current, &P, &P).unwrap();
        assert_eq!(ie, [0x1c, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(page_bytes(0x19, PageControl::Current, &P, &P).is_none());
    }

    /// SPC-4 §7.5.5: MODE SENSE(6) header with a short block descriptor; (10) with a long one.
    #[test]
    fn headers_exact() {
        let b = mode_sense_data(false, true, Some((0x1000, 512)), false, &[0x1c, 0x00]);
        assert_eq!(b, [13, 0, 0x90, 8, 0, 0, 0x10, 0, 0, 0, 2, 0, 0x1c, 0]);
        let b = mode_sense_data(true, false, Some((0x1000, 4096)), true, &[]);
        assert_eq!(
            b,
            [
                0, 22, 0, 0x10, 1, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x10, 0
            ]
        );
        assert_eq!(mode_sense_data(false, false, None, false, &[]), [3, 0, 0x10, 0]);
    }

    /// SPC-4 §6.11: MODE SELECT may change D_SENSE; changing a fixed bit is refused.
    #[test]
    fn mode_select_applies_changeable_bits() {
        let mut data = vec![0, 0, 0, 0];
        let mut ctl = page_bytes(page::CONTROL, PageControl::Current, &P, &P).unwrap();
        ctl[2] |= CONTROL_D_SENSE;
        data.extend_from_slice(&ctl);
        let p = mode_select(false, &data, &P, &P).unwrap();
        assert!(p.d_sense && p.wce);
        data[4 + 3] = 0; // queue algorithm modifier is not changeable
        let e = mode_select(false, &data, &P, &P).unwrap_err();
        assert_eq!(e.code, INVALID_FIELD_IN_PARAMETER_LIST);
        assert_eq!(e.sense_key_specific, Some([0x80, 0, 7]));
        assert_eq!(
            mode_select(false, &[0, 0], &P, &P).unwrap_err().code,
            PARAMETER_LIST_LENGTH_ERROR
        );
    }

    proptest::proptest! {
        /// Arbitrary MODE SELECT parameter data is a value or a sense, never a panic.
        #[test]
        fn mode_select_never_panics(ten: bool, data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = mode_select(ten, &data, &P, &P);
        }
    }
}
