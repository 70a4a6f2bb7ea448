// Fused selective scan for the CPU: forward and backward, float32 and float64.
//
// Built at first use by model/cpu_kernel.py (plain C ABI, loaded with ctypes; no torch headers) and
// called from model/scan.py. Equations, per batch b, channel e, state n (model/scan.py):
//     h[t] = exp(delta[t,e] A[e,n]) h[t-1] + delta[t,e] B[t,n] u[t,e],    h[-1] = 0
//     y[t,e] = sum_n C[t,n] h[t,e,n] + D[e] u[t,e]
//
// Work is split into items of one batch element x one block of W = 16 channels. An item walks the
// sequence once, keeping its (N, W) state in a small buffer that stays in L1; each step is a loop
// over the W channels, which are contiguous in (B, L, E) and which the compiler vectorises (a
// 512-bit register holds 16 floats), exp included (fast_exp below, plain arithmetic, so no vector
// math library and no -ffast-math is needed). Nothing of size (L, E, N) is ever written.
//
// Backward follows the design of mamba-ssm's CUDA kernel: the forward pass saves the state entering
// every segment of K tokens (ckpt, (B, ceil(L/K), N, E)); the backward pass walks the segments from
// last to first, recomputes the states of one segment from its checkpoint into a (K, N, W) buffer,
// then runs the reverse recurrence of the state gradient g through the segment:
//     g[t] = dy[t,e] C[t,n] + exp(delta[t+1,e] A[e,n]) g[t+1]        (plus dh_last at t = L-1)
// dB and dC sum over channels, and dA and dD over the batch: each item writes its own partial sums
// and a final pass adds them in a fixed order, so the result does not depend on the thread count.
//
// Threads: items are dealt round-robin to n_threads threads (see parallel_items); the caller
// (ctypes) has released the GIL. Tail lanes of a block past E are computed on zeros and never stored.

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// Everything called inside a lane loop must inline, or the loop stays scalar.
#define SS_INLINE inline __attribute__((always_inline))

constexpr int W = 16;  // channels per block: one AVX-512 register of float32, two of AVX2

// exp(x) for a vectorisable loop: 2^k * p(r) with x = k ln2 + r, |r| <= ln2/2, p a Taylor
// polynomial (degree 7 in float32: < 1 ulp of truncation error; degree 12 in float64). The input is
// clamped to [lo, hi] first, so exp saturates: below lo (a decay past exp(-87) in float32, or
// exp(-708) in float64) it returns exp(lo), the smallest normal number, where the reference returns
// 0 or a denormal; the state it multiplies then differs by less than 1e-37 of its size. Above hi it
// returns about the largest finite number. NaN propagates.
template <typename T>
struct ExpTraits;

template <>
struct ExpTraits<float> {
    using Int = int32_t;
    static constexpr float lo = -87.3f, hi = 88.7f;
    static constexpr float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    static constexpr float ln2_hi = 0.693145751953125f, ln2_lo = 1.428606765330187e-06f;
    static constexpr int mant_bits = 23, bias = 127, degree = 7;
};

template <>
struct ExpTraits<double> {
    using Int = int64_t;
    static constexpr double lo = -708.0, hi = 709.7;
    static constexpr double round_magic = 6755399441055744.0;  // 1.5 * 2^52
    static constexpr double ln2_hi = 0.6931471803691238, ln2_lo = 1.9082149292705877e-10;
    static constexpr int mant_bits = 52, bias = 1023, degree = 12;
};

template <typename T>
constexpr T inv_factorial(int i) {
    T f = T(1);
    for (int j = 2; j <= i; ++j) f *= T(j);
    return T(1) / f;
}

// sum_{i=I..DEG} r^(i-I) / i! in Horner form, unrolled at compile time (a loop here would keep the
// compiler from vectorising the loops that call fast_exp).
template <typename T, int I, int DEG>
SS_INLINE T taylor_exp(T r) {
    constexpr T c = inv_factorial<T>(I);
    if constexpr (I == DEG) {
        return c;
    } else {
        return taylor_exp<T, I + 1, DEG>(r) * r + c;
    }
}

template <typename T>
SS_INLINE T fast_exp(T x) {
    using X = ExpTraits<T>;
    using I = typename X::Int;
    const T lo = X::lo, hi = X::hi;  // values, not references: the clamp must be branch-free
    T xc = x < lo ? lo : x;  // NaN stays NaN (a comparison with NaN is false)
    xc = xc > hi ? hi : xc;
    const T kf = (xc * T(1.4426950408889634) + X::round_magic) - X::round_magic;  // round(x / ln2)
    const T r = (xc - kf * X::ln2_hi) - kf * X::ln2_lo;
    const T p = taylor_exp<T, 0, X::degree>(r);
    const T scale = std::bit_cast<T>(static_cast<I>(static_cast<I>(kf) + X::bias) << X::mant_bits);
    return p * scale;
}

template <typename T>
struct Problem {
    const T *u, *delta, *A, *B, *C, *D;  // D may be null
    int64_t batch, L, E, N, K;          // K: checkpoint segment length
    int64_t blocks() const { return (E + W - 1) / W; }
    int64_t segments() const { return (L + K - 1) / K; }
};

// Copy W lanes of row src (channels e0..e0+W) into dst; lanes past E read as zero.
template <typename T, bool FULL>
SS_INLINE void load_lanes(T *dst, const T *src, int bw) {
    if constexpr (FULL) {
        for (int w = 0; w < W; ++w) dst[w] = src[w];
    } else {
        for (int w = 0; w < W; ++w) dst[w] = w < bw ? src[w] : T(0);
    }
}

template <typename T, bool FULL>
SS_INLINE void store_lanes(T *dst, const T *src, int bw) {
    if constexpr (FULL) {
        for (int w = 0; w < W; ++w) dst[w] = src[w];
    } else {
        for (int w = 0; w < bw; ++w) dst[w] = src[w];
    }
}

// A block's slice of A (E, N) as (N, W) lanes, and of D.
template <typename T>
void load_block_params(const Problem<T> &p, int64_t e0, int bw, T *A_blk, T *D_blk) {
    for (int64_t n = 0; n < p.N; ++n)
        for (int w = 0; w < W; ++w) A_blk[n * W + w] = w < bw ? p.A[(e0 + w) * p.N + n] : T(0);
    for (int w = 0; w < W; ++w) D_blk[w] = (p.D != nullptr && w < bw) ? p.D[e0 + w] : T(0);
}

template <typename T, bool FULL>
void forward_item(const Problem<T> &p, int64_t b, int64_t blk, T *y, T *h_last, T *ckpt, T *work) {
    const int64_t L = p.L, E = p.E, N = p.N, e0 = blk * W;
    const int bw = static_cast<int>(std::min<int64_t>(W, E - e0));
    T *h = work;              // (N, W) state
    T *A_blk = work + N * W;  // (N, W)
    T D_blk[W];
    load_block_params(p, e0, bw, A_blk, D_blk);
    std::fill(h, h + N * W, T(0));
    const T *u = p.u + b * L * E + e0, *delta = p.delta + b * L * E + e0;
    const T *Bm = p.B + b * L * N, *Cm = p.C + b * L * N;
    T *yb = y + b * L * E + e0;

    for (int64_t t = 0; t < L; ++t) {
        if (ckpt != nullptr && t % p.K == 0) {  // state entering segment t / K
            T *dst = ckpt + ((b * p.segments() + t / p.K) * N) * E + e0;
            for (int64_t n = 0; n < N; ++n) store_lanes<T, FULL>(dst + n * E, h + n * W, bw);
        }
        T uu[W], dd[W], du[W], acc[W];
        load_lanes<T, FULL>(uu, u + t * E, bw);
        load_lanes<T, FULL>(dd, delta + t * E, bw);
        for (int w = 0; w < W; ++w) {
            du[w] = dd[w] * uu[w];
            acc[w] = D_blk[w] * uu[w];
        }
        for (int64_t n = 0; n < N; ++n) {
            const T bn = Bm[t * N + n], cn = Cm[t * N + n];
            T *hn = h + n * W;
            const T *An = A_blk + n * W;
            for (int w = 0; w < W; ++w) {
                const T hv = fast_exp(dd[w] * An[w]) * hn[w] + du[w] * bn;
                hn[w] = hv;
                acc[w] += hv * cn;
            }
        }
        store_lanes<T, FULL>(yb + t * E, acc, bw);
    }
    if (h_last != nullptr)
        for (int w = 0; w < bw; ++w)
            for (int64_t n = 0; n < N; ++n) h_last[(b * E + e0 + w) * N + n] = h[n * W + w];
}

template <typename T, bool FULL>
void backward_item(const Problem<T> &p, int64_t b, int64_t blk, const T *ckpt, const T *dy,
                   const T *dh_last, T *du_out, T *ddelta_out, T *dA_part, T *dB_part, T *dC_part,
                   T *dD_part, T *work) {
    const int64_t L = p.L, E = p.E, N = p.N, K = p.K, e0 = blk * W, NW = N * W;
    const int bw = static_cast<int>(std::min<int64_t>(W, E - e0));
    T *g = work;               // (N, W) gradient of the state after the current step
    T *A_blk = g + NW;         // (N, W)
    T *dA_acc = A_blk + NW;    // (N, W)
    T *hbuf = dA_acc + NW;        // (K + 1, N, W): state entering each step of the segment
    T *abuf = hbuf + (K + 1) * NW;  // (K, N, W): decay exp(delta A) of each step
    T D_blk[W], dD_acc[W];
    load_block_params(p, e0, bw, A_blk, D_blk);
    std::fill(dA_acc, dA_acc + NW, T(0));
    std::fill(dD_acc, dD_acc + W, T(0));
    for (int64_t n = 0; n < N; ++n)
        for (int w = 0; w < W; ++w)
            g[n * W + w] = (dh_last != nullptr && w < bw) ? dh_last[(b * E + e0 + w) * N + n] : T(0);

    const int64_t off = b * L * E + e0;
    const T *u = p.u + off, *delta = p.delta + off, *dyb = dy + off;
    const T *Bm = p.B + b * L * N, *Cm = p.C + b * L * N;
    T *dBp = dB_part + (blk * p.batch + b) * L * N, *dCp = dC_part + (blk * p.batch + b) * L * N;

    for (int64_t s = p.segments() - 1; s >= 0; --s) {
        const int64_t t0 = s * K, len = std::min(K, L - t0);
        const T *src = ckpt + ((b * p.segments() + s) * N) * E + e0;
        for (int64_t n = 0; n < N; ++n) load_lanes<T, FULL>(hbuf + n * W, src + n * E, bw);
        for (int64_t k = 0; k < len; ++k) {  // recompute the segment's states
            T uu[W], dd[W];
            load_lanes<T, FULL>(uu, u + (t0 + k) * E, bw);
            load_lanes<T, FULL>(dd, delta + (t0 + k) * E, bw);
            T *hk = hbuf + k * NW, *ak = abuf + k * NW;
            for (int64_t n = 0; n < N; ++n) {
                const T bn = Bm[(t0 + k) * N + n];
                for (int w = 0; w < W; ++w) {
                    const T a = fast_exp(dd[w] * A_blk[n * W + w]);
                    ak[n * W + w] = a;
                    hk[NW + n * W + w] = a * hk[n * W + w] + dd[w] * uu[w] * bn;  // (unused after the last step)
                }
            }
        }
        for (int64_t k = len - 1; k >= 0; --k) {  // reverse recurrence
            const int64_t t = t0 + k;
            T uu[W], dd[W], dyw[W], du[W], gB[W], dlog[W];
            load_lanes<T, FULL>(uu, u + t * E, bw);
            load_lanes<T, FULL>(dd, delta + t * E, bw);
            load_lanes<T, FULL>(dyw, dyb + t * E, bw);
            for (int w = 0; w < W; ++w) {
                du[w] = dd[w] * uu[w];
                gB[w] = T(0);
                dlog[w] = T(0);
            }
            const T *hk = hbuf + k * NW, *ak = abuf + k * NW;
            for (int64_t n = 0; n < N; ++n) {
                const T bn = Bm[t * N + n], cn = Cm[t * N + n];
                const T *hp = hk + n * W, *an = ak + n * W, *An = A_blk + n * W;
                T *gn = g + n * W, *dAn = dA_acc + n * W;
                T sum_c = T(0), sum_b = T(0);
#pragma omp simd reduction(+ : sum_c, sum_b)
                for (int w = 0; w < W; ++w) {
                    const T h_t = an[w] * hp[w] + du[w] * bn;  // state after step t
                    const T gv = gn[w] + dyw[w] * cn;          // dL/dh[t]
                    sum_c += dyw[w] * h_t;
                    sum_b += gv * du[w];
                    gB[w] += gv * bn;
                    const T da = gv * hp[w] * an[w];  // dL/d(delta A): through a = exp(delta A)
                    dlog[w] += da * An[w];
                    dAn[w] += da * dd[w];
                    gn[w] = gv * an[w];  // dL/dh[t-1] from this step
                }
                dCp[t * N + n] = sum_c;
                dBp[t * N + n] = sum_b;
            }
            T du_t[W], dd_t[W];
            for (int w = 0; w < W; ++w) {
                du_t[w] = gB[w] * dd[w] + dyw[w] * D_blk[w];
                dd_t[w] = gB[w] * uu[w] + dlog[w];
                dD_acc[w] += dyw[w] * uu[w];
            }
            store_lanes<T, FULL>(du_out + off + t * E, du_t, bw);
            store_lanes<T, FULL>(ddelta_out + off + t * E, dd_t, bw);
        }
    }
    for (int w = 0; w < bw; ++w) {
        for (int64_t n = 0; n < N; ++n) dA_part[(b * E + e0 + w) * N + n] = dA_acc[n * W + w];
        dD_part[b * E + e0 + w] = dD_acc[w];
    }
}

// Run fn(item, work) for items 0..n_items-1 on up to n_threads threads, each with its own scratch.
// Built with OpenMP (the default), the threads are PyTorch's own: the library links libgomp.so.1,
// which the loader resolves to the copy torch has loaded, so no second pool competes for the cores
// with torch's spinning workers (a private std::thread pool ran the backward at half speed inside
// a training step on 2 cores). Without OpenMP, std::thread.
template <typename T, typename Fn>
void parallel_items(int64_t n_items, int n_threads, int64_t work_size, Fn fn) {
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, n_items)));
    auto run = [&](int tid) {
        std::vector<T> work(static_cast<size_t>(work_size));
        for (int64_t i = tid; i < n_items; i += nt) fn(i, work.data());
    };
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
    run(omp_get_thread_num());
#else
    std::vector<std::thread> pool;
    for (int tid = 1; tid < nt; ++tid) pool.emplace_back(run, tid);
    run(0);
    for (auto &th : pool) th.join();
#endif
}

template <typename T>
void forward(const Problem<T> &p, T *y, T *h_last, T *ckpt, int n_threads) {
    const int64_t blocks = p.blocks();
    const bool full_tail = p.E % W == 0;
    parallel_items<T>(p.batch * blocks, n_threads, 2 * p.N * W, [&](int64_t i, T *work) {
        const int64_t b = i / blocks, blk = i % blocks;
        if (full_tail || blk + 1 < blocks)
            forward_item<T, true>(p, b, blk, y, h_last, ckpt, work);
        else
            forward_item<T, false>(p, b, blk, y, h_last, ckpt, work);
    });
}

template <typename T>
void backward(const Problem<T> &p, const T *ckpt, const T *dy, const T *dh_last, T *du, T *ddelta,
              T *dA, T *dB, T *dC, T *dD, T *scratch, int n_threads) {
    // scratch: dB and dC partials (blocks, batch, L, N) each, dA partials (batch, E, N), dD (batch, E)
    const int64_t blocks = p.blocks(), rows = p.batch * p.L * p.N;
    T *dB_part = scratch, *dC_part = dB_part + blocks * rows, *dA_part = dC_part + blocks * rows;
    T *dD_part = dA_part + p.batch * p.E * p.N;
    const bool full_tail = p.E % W == 0;
    parallel_items<T>(p.batch * blocks, n_threads, (4 + 2 * p.K) * p.N * W, [&](int64_t i, T *work) {
        const int64_t b = i / blocks, blk = i % blocks;
        if (full_tail || blk + 1 < blocks)
            backward_item<T, true>(p, b, blk, ckpt, dy, dh_last, du, ddelta, dA_part, dB_part, dC_part,
                                   dD_part, work);
        else
            backward_item<T, false>(p, b, blk, ckpt, dy, dh_last, du, ddelta, dA_part, dB_part, dC_part,
                                    dD_part, work);
    });
    // Sum the partials in a fixed order (blocks for dB/dC, batch for dA/dD), split over rows.
    const int64_t pieces = std::max<int64_t>(1, n_threads);
    const int64_t chunk = (rows + pieces - 1) / pieces;
    parallel_items<T>(pieces, n_threads, 0, [&](int64_t piece, T *) {
        const int64_t r0 = piece * chunk, r1 = std::min(rows, r0 + chunk);
        for (int64_t r = r0; r < r1; ++r) {
            T sb = T(0), sc = T(0);
            for (int64_t blk = 0; blk < blocks; ++blk) {
                sb += dB_part[blk * rows + r];
                sc += dC_part[blk * rows + r];
            }
            dB[r] = sb;
            dC[r] = sc;
        }
    });
    for (int64_t j = 0; j < p.E * p.N; ++j) {
        T s = T(0);
        for (int64_t b = 0; b < p.batch; ++b) s += dA_part[b * p.E * p.N + j];
        dA[j] = s;
    }
    if (dD != nullptr)
        for (int64_t e = 0; e < p.E; ++e) {
            T s = T(0);
            for (int64_t b = 0; b < p.batch; ++b) s += dD_part[b * p.E + e];
            dD[e] = s;
        }
}


// ---- Causal depthwise conv1d + SiLU, the op in front of the scan --------------------------------
//     a[t,e] = bias[e] + sum_k weight[e,k] x[t-K+1+k, e]   (x = 0 before t = 0),   out = a * sigmoid(a)
// Same items (batch x channel block) and lanes as the scan. x may be a view whose rows are spaced by
// x_row elements (the first half of the mixer's in_proj output); out and dx are contiguous.
// Backward recomputes a from x (K multiply-adds) instead of saving it.

template <typename T>
struct ConvProblem {
    const T *x, *weight, *bias;  // x (B, L, E) with row stride x_row; weight (E, K); bias (E,)
    int64_t batch, L, E, K, x_row;
    int64_t blocks() const { return (E + W - 1) / W; }
};

template <typename T>
SS_INLINE T sigmoid(T a) {
    return T(1) / (T(1) + fast_exp(-a));
}

// silu over one block's lanes, and its gradient. Not inlined: inlined into the token loop, gcc
// (12) unrolls these loops before vectorising them and leaves them scalar, 10x slower.
template <typename T>
__attribute__((noinline)) void silu_lanes(const T *__restrict a, T *__restrict out) {
    for (int w = 0; w < W; ++w) out[w] = a[w] * sigmoid(a[w]);
}

template <typename T>
__attribute__((noinline)) void silu_grad_lanes(const T *__restrict a, const T *__restrict g,
                                               T *__restrict da) {
    for (int w = 0; w < W; ++w) {
        const T s = sigmoid(a[w]);
        da[w] = g[w] * s * (T(1) + a[w] * (T(1) - s));  // g * d silu(a) / da
    }
}

// One tap k of the conv, backward: dx += weight_k * da, dweight_k += da * x (not inlined: as above).
template <typename T>
__attribute__((noinline)) void tap_grad_lanes(const T *__restrict x, const T *__restrict da,
                                              const T *__restrict weight, T *__restrict dx,
                                              T *__restrict dweight) {
    for (int w = 0; w < W; ++w) {
        dx[w] += weight[w] * da[w];
        dweight[w] += da[w] * x[w];
    }
}

// a[t] for one block's lanes
template <typename T, bool FULL>
SS_INLINE void conv_pre(const ConvProblem<T> &p, const T *xb, int64_t t, const T *w_blk, const T *b_blk,
                     int bw, T *a) {
    for (int w = 0; w < W; ++w) a[w] = b_blk[w];
    for (int64_t k = std::max<int64_t>(0, p.K - 1 - t); k < p.K; ++k) {
        const int64_t src = t - (p.K - 1) + k;
        T xv[W];
        load_lanes<T, FULL>(xv, xb + src * p.x_row, bw);
        for (int w = 0; w < W; ++w) a[w] += w_blk[k * W + w] * xv[w];
    }
}

template <typename T>
void load_conv_params(const ConvProblem<T> &p, int64_t e0, int bw, T *w_blk, T *b_blk) {
    for (int64_t k = 0; k < p.K; ++k)
        for (int w = 0; w < W; ++w) w_blk[k * W + w] = w < bw ? p.weight[(e0 + w) * p.K + k] : T(0);
    for (int w = 0; w < W; ++w) b_blk[w] = w < bw ? p.bias[e0 + w] : T(0);
}

template <typename T, bool FULL>
void conv_forward_item(const ConvProblem<T> &p, int64_t b, int64_t blk, T *out, T *work) {
    const int64_t e0 = blk * W;
    const int bw = static_cast<int>(std::min<int64_t>(W, p.E - e0));
    T *w_blk = work, b_blk[W];
    load_conv_params(p, e0, bw, w_blk, b_blk);
    const T *xb = p.x + b * p.L * p.x_row + e0;
    T *ob = out + b * p.L * p.E + e0;
    for (int64_t t = 0; t < p.L; ++t) {
        T a[W], o[W];
        conv_pre<T, FULL>(p, xb, t, w_blk, b_blk, bw, a);
        silu_lanes(a, o);
        store_lanes<T, FULL>(ob + t * p.E, o, bw);
    }
}

template <typename T, bool FULL>
void conv_backward_item(const ConvProblem<T> &p, int64_t b, int64_t blk, const T *dout, T *dx,
                        T *dw_part, T *db_part, T *work) {
    const int64_t e0 = blk * W, K = p.K;
    const int bw = static_cast<int>(std::min<int64_t>(W, p.E - e0));
    T *w_blk = work, *dw_acc = work + K * W, b_blk[W], db_acc[W];
    load_conv_params(p, e0, bw, w_blk, b_blk);
    std::fill(dw_acc, dw_acc + K * W, T(0));
    std::fill(db_acc, db_acc + W, T(0));
    const T *xb = p.x + b * p.L * p.x_row + e0, *gb = dout + b * p.L * p.E + e0;
    T *dxb = dx + b * p.L * p.E + e0;
    for (int64_t t = 0; t < p.L; ++t) {
        T a[W], g[W], da[W];
        conv_pre<T, FULL>(p, xb, t, w_blk, b_blk, bw, a);
        load_lanes<T, FULL>(g, gb + t * p.E, bw);
        silu_grad_lanes(a, g, da);
        for (int w = 0; w < W; ++w) db_acc[w] += da[w];
        // da[t] reaches x[t-K+1+k] through weight k; row t of dx is first touched here (k = K-1)
        for (int64_t k = K - 1; k >= 0; --k) {
            const int64_t dst = t - (K - 1) + k;
            if (dst < 0) break;
            T xv[W], dxv[W];
            load_lanes<T, FULL>(xv, xb + dst * p.x_row, bw);
            if (k == K - 1) {
                for (int w = 0; w < W; ++w) dxv[w] = T(0);
            } else {
                load_lanes<T, FULL>(dxv, dxb + dst * p.E, bw);
            }
            tap_grad_lanes(xv, da, w_blk + k * W, dxv, dw_acc + k * W);
            store_lanes<T, FULL>(dxb + dst * p.E, dxv, bw);
        }
    }
    for (int w = 0; w < bw; ++w) {
        for (int64_t k = 0; k < K; ++k) dw_part[(b * p.E + e0 + w) * K + k] = dw_acc[k * W + w];
        db_part[b * p.E + e0 + w] = db_acc[w];
    }
}

template <typename T>
void conv_forward(const ConvProblem<T> &p, T *out, int n_threads) {
    const int64_t blocks = p.blocks();
    const bool full_tail = p.E % W == 0;
    parallel_items<T>(p.batch * blocks, n_threads, p.K * W, [&](int64_t i, T *work) {
        const int64_t b = i / blocks, blk = i % blocks;
        if (full_tail || blk + 1 < blocks)
            conv_forward_item<T, true>(p, b, blk, out, work);
        else
            conv_forward_item<T, false>(p, b, blk, out, work);
    });
}

template <typename T>
void conv_backward(const ConvProblem<T> &p, const T *dout, T *dx, T *dw, T *db, T *scratch, int n_threads) {
    // scratch: dw partials (batch, E, K), db partials (batch, E), summed over the batch in order
    const int64_t blocks = p.blocks();
    T *dw_part = scratch, *db_part = scratch + p.batch * p.E * p.K;
    const bool full_tail = p.E % W == 0;
    parallel_items<T>(p.batch * blocks, n_threads, 2 * p.K * W, [&](int64_t i, T *work) {
        const int64_t b = i / blocks, blk = i % blocks;
        if (full_tail || blk + 1 < blocks)
            conv_backward_item<T, true>(p, b, blk, dout, dx, dw_part, db_part, work);
        else
            conv_backward_item<T, false>(p, b, blk, dout, dx, dw_part, db_part, work);
    });
    for (int64_t j = 0; j < p.E * p.K; ++j) {
        T s = T(0);
        for (int64_t b = 0; b < p.batch; ++b) s += dw_part[b * p.E * p.K + j];
        dw[j] = s;
    }
    for (int64_t e = 0; e < p.E; ++e) {
        T s = T(0);
        for (int64_t b = 0; b < p.batch; ++b) s += db_part[b * p.E + e];
        db[e] = s;
    }
}

}  // namespace

// The C ABI that model/cpu_kernel.py binds. Tensors are contiguous, of one dtype, shaped as in
// model/scan.py; ckpt is (B, ceil(L/K), N, E) and may be null when no backward pass will follow.
// Returns 0 on success, 1 on bad sizes.
#define SS_EXPORT extern "C" __attribute__((visibility("default")))

#define SS_DEFINE(SUFFIX, T)                                                                          \
    SS_EXPORT int ss_forward_##SUFFIX(const T *u, const T *delta, const T *A, const T *B, const T *C, \
                                      const T *D, T *y, T *h_last, T *ckpt, int64_t batch, int64_t L, \
                                      int64_t E, int64_t N, int64_t K, int n_threads) {               \
        if (batch < 1 || L < 1 || E < 1 || N < 1 || K < 1) return 1;                                  \
        forward<T>(Problem<T>{u, delta, A, B, C, D, batch, L, E, N, K}, y, h_last, ckpt, n_threads);  \
        return 0;                                                                                     \
    }                                                                                                 \
    SS_EXPORT int64_t ss_backward_scratch_##SUFFIX(int64_t batch, int64_t L, int64_t E, int64_t N) {  \
        return 2 * ((E + W - 1) / W) * batch * L * N + batch * E * N + batch * E;                     \
    }                                                                                                 \
    SS_EXPORT int ss_backward_##SUFFIX(const T *u, const T *delta, const T *A, const T *B,            \
                                       const T *C, const T *D, const T *ckpt, const T *dy,            \
                                       const T *dh_last, T *du, T *ddelta, T *dA, T *dB, T *dC,       \
                                       T *dD, T *scratch, int64_t batch, int64_t L, int64_t E,        \
                                       int64_t N, int64_t K, int n_threads) {                         \
        if (batch < 1 || L < 1 || E < 1 || N < 1 || K < 1) return 1;                                  \
        backward<T>(Problem<T>{u, delta, A, B, C, D, batch, L, E, N, K}, ckpt, dy, dh_last, du,       \
                    ddelta, dA, dB, dC, dD, scratch, n_threads);                                      \
        return 0;                                                                                     \
    }

#define CONV_DEFINE(SUFFIX, T)                                                                        \
    SS_EXPORT int conv_silu_forward_##SUFFIX(const T *x, const T *weight, const T *bias, T *out,       \
                                             int64_t batch, int64_t L, int64_t E, int64_t K,           \
                                             int64_t x_row, int n_threads) {                           \
        if (batch < 1 || L < 1 || E < 1 || K < 1 || x_row < E) return 1;                              \
        conv_forward<T>(ConvProblem<T>{x, weight, bias, batch, L, E, K, x_row}, out, n_threads);      \
        return 0;                                                                                     \
    }                                                                                                 \
    SS_EXPORT int conv_silu_backward_##SUFFIX(const T *x, const T *weight, const T *bias,            \
                                              const T *dout, T *dx, T *dw, T *db, T *scratch,         \
                                              int64_t batch, int64_t L, int64_t E, int64_t K,          \
                                              int64_t x_row, int n_threads) {                          \
        if (batch < 1 || L < 1 || E < 1 || K < 1 || x_row < E) return 1;                              \
        conv_backward<T>(ConvProblem<T>{x, weight, bias, batch, L, E, K, x_row}, dout, dx, dw, db,    \
                         scratch, n_threads);                                                         \
        return 0;                                                                                     \
    }

SS_DEFINE(f32, float)
SS_DEFINE(f64, double)
CONV_DEFINE(f32, float)
CONV_DEFINE(f64, double)

SS_EXPORT int ss_abi_version() { return 2; }
