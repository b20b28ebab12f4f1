/*
 * snapgate-getrandom: an OpenSSL 3 provider whose random generator keeps
 * no state: every request is answered by the kernel's getrandom(2).
 *
 * Why it exists. The Node.js runtime of snapgate is started once, in a
 * template VM, and every instance of every app is a clone of that VM.
 * OpenSSL's own generators (the primary, public and private DRBGs) are
 * seeded when Node.js starts and reseed only after a count of requests, an
 * interval of wall-clock time or a change of process id; none of these
 * happens when a snapshot is restored, so every clone would carry the same
 * DRBG state and draw the same bytes (session ids, keys, TLS randoms).
 * Node.js offers no call that reseeds OpenSSL, and OpenSSL's configuration
 * can only choose which generator algorithm runs, not make one reseed on
 * every call. This provider is that algorithm: with it selected in the
 * runtime's openssl.cnf (`[random] random = SNAPGATE-GETRANDOM`), OpenSSL
 * holds no generator state at all, and a clone draws fresh bytes as soon
 * as its kernel generator was reseeded (the guest agent does that with
 * host entropy before an app runs in a clone; see guest/init/src/resume.rs).
 *
 * It is C, built against Debian's own libssl-dev headers by
 * scripts/build-node-runtime, because a provider is a C ABI (OSSL_DISPATCH
 * tables) and the headers are what keeps its structures the library's own.
 *
 * The generator answers the EVP_RAND calls OpenSSL makes of the DRBGs it
 * replaces (crypto/evp/evp_rand.c, crypto/rand/rand_lib.c in OpenSSL 3):
 * new/free, instantiate/uninstantiate, generate, reseed (a no-op: nothing
 * to reseed), locking (none is needed: no state changes after
 * instantiation), the state, strength and max_request parameters, and
 * get_seed/clear_seed so that a DRBG may also use it as its parent.
 *
 * The first time OpenSSL instantiates one of its generators with this
 * algorithm, the provider sets SNAPGATE_OPENSSL_RAND=getrandom in the
 * process environment: the runtime's loader checks it, since a provider
 * that is loaded but not selected as the generator would change nothing.
 * (OpenSSL instantiates its primary generator at its first use, which in
 * Node.js is a check at start-up, before any other thread runs: setenv is
 * safe there.)
 */

#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include <openssl/core.h>
#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

/* Security strength claimed, in bits: the kernel's ChaCha20 CRNG. */
#define STRENGTH 256
/* Largest single request; OpenSSL splits larger ones (evp_rand.c). */
#define MAX_REQUEST (1 << 16)

typedef struct {
    int state; /* EVP_RAND_STATE_* */
} generator;

/* Whether SNAPGATE_OPENSSL_RAND was set (see the top of this file). */
static atomic_flag announced = ATOMIC_FLAG_INIT;

/* Fills out[0..len) from getrandom(2); 0 on failure. */
static int fill(unsigned char *out, size_t len)
{
    while (len > 0) {
        ssize_t n = getrandom(out, len, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return 0;
        }
        out += n;
        len -= (size_t)n;
    }
    return 1;
}

static void *gen_new(void *provctx, void *parent, const OSSL_DISPATCH *parent_calls)
{
    /* The parent (OpenSSL's seed source, or the primary generator) is not
     * needed: the kernel is the source of every byte. */
    generator *g = calloc(1, sizeof(*g));
    (void)provctx;
    (void)parent;
    (void)parent_calls;
    if (g != NULL)
        g->state = EVP_RAND_STATE_UNINITIALISED;
    return g;
}

static void gen_free(void *vctx)
{
    free(vctx);
}

static int gen_instantiate(void *vctx, unsigned int strength, int prediction_resistance,
                           const unsigned char *pstr, size_t pstr_len, const OSSL_PARAM params[])
{
    generator *g = vctx;
    (void)prediction_resistance;
    (void)pstr;
    (void)pstr_len;
    (void)params; /* reseed intervals of the DRBG this replaces: moot */
    if (strength > STRENGTH)
        return 0;
    g->state = EVP_RAND_STATE_READY;
    if (!atomic_flag_test_and_set(&announced))
        setenv("SNAPGATE_OPENSSL_RAND", "getrandom", 1);
    return 1;
}

static int gen_uninstantiate(void *vctx)
{
    generator *g = vctx;
    g->state = EVP_RAND_STATE_UNINITIALISED;
    return 1;
}

static int gen_generate(void *vctx, unsigned char *out, size_t outlen, unsigned int strength,
                        int prediction_resistance, const unsigned char *adin, size_t adin_len)
{
    generator *g = vctx;
    (void)prediction_resistance; /* every call is a fresh draw anyway */
    (void)adin;
    (void)adin_len;
    if (g->state != EVP_RAND_STATE_READY || strength > STRENGTH)
        return 0;
    /* A failed call fails alone: nothing is left in a broken state. */
    return fill(out, outlen);
}

static int gen_reseed(void *vctx, int prediction_resistance, const unsigned char *ent,
                      size_t ent_len, const unsigned char *adin, size_t adin_len)
{
    generator *g = vctx;
    (void)prediction_resistance;
    (void)ent;
    (void)ent_len;
    (void)adin;
    (void)adin_len;
    return g->state == EVP_RAND_STATE_READY;
}

static int gen_enable_locking(void *vctx)
{
    (void)vctx;
    return 1;
}

static const OSSL_PARAM *gen_gettable_ctx_params(void *vctx, void *provctx)
{
    static const OSSL_PARAM gettable[] = {
        OSSL_PARAM_int(OSSL_RAND_PARAM_STATE, NULL),
        OSSL_PARAM_uint(OSSL_RAND_PARAM_STRENGTH, NULL),
        OSSL_PARAM_size_t(OSSL_RAND_PARAM_MAX_REQUEST, NULL),
        OSSL_PARAM_uint(OSSL_DRBG_PARAM_RESEED_COUNTER, NULL),
        OSSL_PARAM_END,
    };
    (void)vctx;
    (void)provctx;
    return gettable;
}

static int gen_get_ctx_params(void *vctx, OSSL_PARAM params[])
{
    generator *g = vctx;
    OSSL_PARAM *p;
    if ((p = OSSL_PARAM_locate(params, OSSL_RAND_PARAM_STATE)) != NULL
        && !OSSL_PARAM_set_int(p, g->state))
        return 0;
    if ((p = OSSL_PARAM_locate(params, OSSL_RAND_PARAM_STRENGTH)) != NULL
        && !OSSL_PARAM_set_uint(p, STRENGTH))
        return 0;
    if ((p = OSSL_PARAM_locate(params, OSSL_RAND_PARAM_MAX_REQUEST)) != NULL
        && !OSSL_PARAM_set_size_t(p, MAX_REQUEST))
        return 0;
    /* A DRBG child reseeds when this changes; it never needs to, since its
     * seed came straight from the kernel. */
    if ((p = OSSL_PARAM_locate(params, OSSL_DRBG_PARAM_RESEED_COUNTER)) != NULL
        && !OSSL_PARAM_set_uint(p, 1))
        return 0;
    return 1;
}

static size_t gen_get_seed(void *vctx, unsigned char **pout, int entropy, size_t min_len,
                           size_t max_len, int prediction_resistance,
                           const unsigned char *adin, size_t adin_len)
{
    size_t len = min_len;
    unsigned char *buf;
    (void)vctx;
    (void)prediction_resistance;
    (void)adin;
    (void)adin_len;
    if (entropy > 0 && (size_t)(entropy + 7) / 8 > len)
        len = (size_t)(entropy + 7) / 8;
    if (len > max_len)
        return 0;
    if ((buf = malloc(len)) == NULL)
        return 0;
    if (!fill(buf, len)) {
        free(buf);
        return 0;
    }
    *pout = buf;
    return len;
}

static void gen_clear_seed(void *vctx, unsigned char *out, size_t outlen)
{
    (void)vctx;
    OPENSSL_cleanse(out, outlen);
    free(out);
}

static const OSSL_DISPATCH generator_calls[] = {
    { OSSL_FUNC_RAND_NEWCTX, (void (*)(void))gen_new },
    { OSSL_FUNC_RAND_FREECTX, (void (*)(void))gen_free },
    { OSSL_FUNC_RAND_INSTANTIATE, (void (*)(void))gen_instantiate },
    { OSSL_FUNC_RAND_UNINSTANTIATE, (void (*)(void))gen_uninstantiate },
    { OSSL_FUNC_RAND_GENERATE, (void (*)(void))gen_generate },
    { OSSL_FUNC_RAND_RESEED, (void (*)(void))gen_reseed },
    { OSSL_FUNC_RAND_ENABLE_LOCKING, (void (*)(void))gen_enable_locking },
    { OSSL_FUNC_RAND_GETTABLE_CTX_PARAMS, (void (*)(void))gen_gettable_ctx_params },
    { OSSL_FUNC_RAND_GET_CTX_PARAMS, (void (*)(void))gen_get_ctx_params },
    { OSSL_FUNC_RAND_GET_SEED, (void (*)(void))gen_get_seed },
    { OSSL_FUNC_RAND_CLEAR_SEED, (void (*)(void))gen_clear_seed },
    { 0, NULL },
};

static const OSSL_ALGORITHM generators[] = {
    { "SNAPGATE-GETRANDOM", "provider=snapgate-getrandom", generator_calls,
      "getrandom(2) on every call: no generator state in the process" },
    { NULL, NULL, NULL, NULL },
};

static const OSSL_ALGORITHM *query(void *provctx, int operation_id, int *no_cache)
{
    (void)provctx;
    *no_cache = 0;
    return operation_id == OSSL_OP_RAND ? generators : NULL;
}

static const OSSL_DISPATCH provider_calls[] = {
    { OSSL_FUNC_PROVIDER_QUERY_OPERATION, (void (*)(void))query },
    { 0, NULL },
};

/* The entry point OpenSSL looks up when the configuration loads this module. */
int OSSL_provider_init(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in,
                       const OSSL_DISPATCH **out, void **provctx)
{
    (void)handle;
    (void)in;
    *out = provider_calls;
    *provctx = (void *)handle;
    return 1;
}
