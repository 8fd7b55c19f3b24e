// Token-level tests live in tests/pdp.rs (real keys, real HTTP); see there.
