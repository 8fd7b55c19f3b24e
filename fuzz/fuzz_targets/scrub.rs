//! The scrubber (`egress::scrub`): every spelling of a secret value (percent, JSON, base64,
//! inside a longer base64 run) compiled into one automaton, then applied whole and streamed.
//!
//! Properties: building never panics for any value; the streamed scrub of every two-chunk split
//! equals the one-shot scrub; `scrub_capped` keeps at most `cap` bytes of input and agrees with
//! the one-shot scrub when nothing is cut.
//!
//! Input: byte 0 picks the forms (bit 0 percent, bit 1 JSON, bit 2 base64); then the value up
//! to the first `\n`; the rest is the data.

#![no_main]

use bytes::Bytes;
use kz_agent::egress::scrub::MARKER;
use kz_agent::egress::{Forms, Scrubber};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
        return;
    };
    let (value, input) = (&rest[..nl], &rest[nl + 1..]);
    if value.len() > 256 || input.len() > 2048 {
        return;
    }
    let forms = Forms {
        percent: flags & 1 != 0,
        json: flags & 2 != 0,
        base64: flags & 4 != 0,
    };
    let Ok(scrubber) = Scrubber::new(
        [value],
        forms,
        kz_agent::egress::Replacement::Marker(MARKER),
    ) else {
        return;
    };
    let whole = scrubber.scrub(input).into_owned();
    if !value.is_empty() && !forms.base64 && !forms.json && !forms.percent {
        // Raw only: a value in the input is gone unless the marker itself could spell it.
        let raw_left = whole.windows(value.len()).any(|w| w == value);
        let could_be_rebuilt = MARKER.as_bytes().iter().any(|b| value.contains(b));
        assert!(
            !raw_left || could_be_rebuilt,
            "raw value left in the output"
        );
    }
    for cut in 0..=input.len() {
        let mut s = scrubber.stream();
        let mut got = s
            .push(Bytes::copy_from_slice(&input[..cut]), &mut |_, _| {})
            .to_vec();
        got.extend_from_slice(&s.push(Bytes::copy_from_slice(&input[cut..]), &mut |_, _| {}));
        got.extend_from_slice(&s.finish(&mut |_, _| {}));
        assert_eq!(got, whole, "streamed scrub differs at cut {cut}");
    }
    let cap = usize::from(flags >> 3) * 16;
    let (capped, cut) = scrubber.scrub_capped(input, cap, true);
    if !cut {
        assert_eq!(
            capped, whole,
            "an uncut capped scrub differs from the scrub"
        );
    }
});
