// Probe: CUTLASS sm90 GEMMs for a decode step's products, out[M,N] = x[M,K] W[N,K]^T (+ beta * out).
#include <cstdio>
#include <type_traits>
#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"

using namespace cute;

template <class TM, class TN, class TK, class CM, class CN, class KS, class ES, class Sched, bool Swap>
struct Probe {
  using E = cutlass::bfloat16_t;
  using Acc = float;
  using LayoutA = cutlass::layout::RowMajor;     // normal: x [M, K]; swapped: W [N, K]
  using LayoutB = cutlass::layout::ColumnMajor;  // normal: W [N, K]; swapped: x [M, K]  (K contiguous)
  using LayoutC = std::conditional_t<Swap, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  using TileShape = Shape<TM, TN, TK>;
  using ClusterShape = Shape<CM, CN, _1>;
  using Epi = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc, E, LayoutC, 8, E, LayoutC, 8, ES>::CollectiveOp;
  using Main = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, E, LayoutA, 8, E, LayoutB, 8, Acc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epi::SharedStorage))>,
      KS>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Main, Epi, Sched>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  template <class S>
  static S stride(int64_t s0, int64_t s1, int64_t s2) {
    S s{};
    if constexpr (!cute::is_static<std::decay_t<decltype(get<0>(s))>>::value) get<0>(s) = s0;
    if constexpr (!cute::is_static<std::decay_t<decltype(get<1>(s))>>::value) get<1>(s) = s1;
    get<2>(s) = s2;
    return s;
  }

  static typename Gemm::Arguments args(const void* x, const void* w, void* out, int M, int N, int K, float beta,
                                       int sm_count) {
    int pm = Swap ? N : M, pn = Swap ? M : N;  // the problem as CUTLASS sees it
    const void* a = Swap ? w : x;
    const void* b = Swap ? x : w;
    typename Gemm::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = {pm, pn, K, 1};
    args.mainloop.ptr_A = static_cast<const E*>(a);
    args.mainloop.dA = stride<typename Kernel::StrideA>(K, 1, int64_t(pm) * K);
    args.mainloop.ptr_B = static_cast<const E*>(b);
    args.mainloop.dB = stride<typename Kernel::StrideB>(K, 1, int64_t(pn) * K);
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = beta;
    args.epilogue.ptr_C = static_cast<const E*>(out);
    args.epilogue.ptr_D = static_cast<E*>(out);
    // out is [M, N] row-major: normal C (pm=M, pn=N) row-major; swapped C (pm=N, pn=M) column-major
    auto dc = Swap ? stride<typename Kernel::StrideC>(1, pm, int64_t(pm) * pn)
                   : stride<typename Kernel::StrideC>(pn, 1, int64_t(pm) * pn);
    auto dd = Swap ? stride<typename Kernel::StrideD>(1, pm, int64_t(pm) * pn)
                   : stride<typename Kernel::StrideD>(pn, 1, int64_t(pm) * pn);
    args.epilogue.dC = dc;
    args.epilogue.dD = dd;
    args.hw_info.device_id = 0;
    args.hw_info.sm_count = sm_count;
    return args;
  }
};

#define PROBE(NAME, ...)                                                                                          \
  using NAME##_t = Probe<__VA_ARGS__>;                                                                          \
  extern "C" size_t NAME##_ws(int M, int N, int K, int sm) {                                                    \
    return NAME##_t::Gemm::get_workspace_size(NAME##_t::args(nullptr, nullptr, nullptr, M, N, K, 1.f, sm));     \
  }                                                                                                             \
  extern "C" int NAME##_run(const void* x, const void* w, void* out, int M, int N, int K, float beta, void* ws,  \
                            int sm, void* stream) {                                                             \
    NAME##_t::Gemm gemm;                                                                                        \
    auto a = NAME##_t::args(x, w, out, M, N, K, beta, sm);                                                      \
    if (gemm.can_implement(a) != cutlass::Status::kSuccess) return 1;                                           \
    if (gemm.initialize(a, ws, static_cast<cudaStream_t>(stream)) != cutlass::Status::kSuccess) return 2;       \
    return gemm.run(static_cast<cudaStream_t>(stream)) == cutlass::Status::kSuccess ? 0 : 3;                    \
  }
