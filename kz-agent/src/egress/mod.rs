//! Egress: the pieces every client that carries a real credential to an upstream shares.
//!
//! Three clients do: the proxy's `forward` (a masked token swapped for the real value), the
//! PDP's token-exchange proxy (`pdp::proxy`, a kz token exchanged for the credential) and MCP
//! `fetch` (`mcp::fetch`, kz makes the request for the agent). Each decides *whether* to send;
//! this module holds *how* a credential leaves and what comes back, in one copy, so a hardening
//! (issue 14) lands once for all three:
//!
//! | file | concern |
//! |---|---|
//! | [`guard`] | address guard: which resolved addresses a credential may go to (SSRF, metadata) |
//! | [`scope`] | host-scope patterns: `name` / `*.suffix`, for token tables, `[blind]`, bundles |
//! | [`scrub`] | the scrubber: real values out of what goes back, one replacement policy |
//! | [`location`] | injection location (`credential_location`) and kz's percent-encoder |
//! | [`hop`] | hop-by-hop headers stripped in both directions |
//! | [`rewrite`] | the streaming find-and-replace engine under the swap and every scrubber |
//!
//! Where the clients still behave differently (which address classes are refused, the marker
//! text, which encoded forms are scrubbed), the difference is a parameter here
//! ([`guard::Classes`], [`scrub::Replacement`], [`scrub::Forms`]) with the reason beside it,
//! never a second copy. `egress` imports no other kz module, so the data plane (`proxy`) and the
//! control plane (`pdp`, `mcp`) can both sit on it.

pub mod guard;
pub mod hop;
pub mod location;
pub mod rewrite;
pub mod scope;
pub mod scrub;

pub use guard::{AddrRule, Classes, Guard, GuardError};
pub use location::{Keep, Location, LocationError, percent_encode};
pub use scope::{ScopeError, ScopePattern};
pub use scrub::{Forms, Replacement, ScrubError, Scrubber};
