/* The wirings by Config residual value: the SF_WIRINGS list (sf.h) is the one registry. */
#include "../sf_wiring.h"

#define SF_WIRING_ENTRY_(id, name, sym) [id] = &sf_wiring_##sym,
static const sf_wiring *const wirings[SF_NUM_WIRINGS] = {SF_WIRINGS(SF_WIRING_ENTRY_)};
#undef SF_WIRING_ENTRY_

const sf_wiring *sf_wiring_of(const sf_config *c) {
    /* validated configs only; an out-of-range value (never validated) still gets a wiring */
    return c->residual >= 0 && c->residual < SF_NUM_WIRINGS ? wirings[c->residual] : &sf_wiring_plain;
}

int64_t sf_attnres_num_sources(const sf_config *c, int64_t k) { return sf_wiring_of(c)->num_sources(c, k); }
