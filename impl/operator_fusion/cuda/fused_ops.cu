// Fused CUDA kernels: bias + GELU(tanh) and residual add + LayerNorm, one pass each.
//
// bias_gelu: a grid-stride loop over the flat tensor; the bias column of element i is i % C.
// add_layer_norm: one block per row; each thread keeps its strided slice of s = x + residual in
// registers (up to kMaxPerThread values), the block reduces sum and sum of squared deviations
// through shared memory (warp shuffles, then one warp over the warp totals), and every thread
// writes its slice of s and y. Arithmetic in float32 whatever the storage dtype (float32,
// bfloat16, float16). Built by impl/operator_fusion/cuda/__init__.py only where torch has CUDA
// and nvcc exists.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

namespace {

constexpr int kThreads = 256;
constexpr int kMaxPerThread = 16;  // rows of up to 256 * 16 = 4096 elements

__device__ __forceinline__ float gelu_tanh(float u) {
  return 0.5f * u * (1.0f + tanhf(0.7978845608028654f * (u + 0.044715f * u * u * u)));
}

template <typename T>
__global__ void bias_gelu_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y, int64_t n,
                                 int64_t C) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    y[i] = static_cast<T>(gelu_tanh(static_cast<float>(x[i]) + static_cast<float>(bias[i % C])));
  }
}

__device__ float block_sum(float v, float* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = (threadIdx.x < blockDim.x / 32) ? shared[lane] : 0.0f;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  const float total = shared[0];
  __syncthreads();  // shared is reused by the next reduction
  return total;
}

template <typename T>
__global__ void add_layer_norm_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                      const T* __restrict__ weight, const T* __restrict__ bias, T* __restrict__ s,
                                      T* __restrict__ y, int64_t C, float eps) {
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * C;
  const T* rr = residual + row * C;
  float vals[kMaxPerThread];
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < kMaxPerThread; ++k) {
    const int64_t c = threadIdx.x + (int64_t)k * blockDim.x;
    vals[k] = c < C ? static_cast<float>(xr[c]) + static_cast<float>(rr[c]) : 0.0f;
    sum += vals[k];
  }
  const float mean = block_sum(sum, shared) / C;
  float sq = 0.0f;
#pragma unroll
  for (int k = 0; k < kMaxPerThread; ++k) {
    const int64_t c = threadIdx.x + (int64_t)k * blockDim.x;
    const float d = c < C ? vals[k] - mean : 0.0f;  // padding lanes must not add mean^2
    sq += d * d;
  }
  const float rstd = rsqrtf(block_sum(sq, shared) / C + eps);
#pragma unroll
  for (int k = 0; k < kMaxPerThread; ++k) {
    const int64_t c = threadIdx.x + (int64_t)k * blockDim.x;
    if (c < C) {
      s[row * C + c] = static_cast<T>(vals[k]);
      y[row * C + c] = static_cast<T>((vals[k] - mean) * rstd * static_cast<float>(weight[c]) +
                                      static_cast<float>(bias[c]));
    }
  }
}

void check_cuda(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fused_ops (CUDA): ", name, " must be a CUDA tensor");
}

}  // namespace

torch::Tensor bias_gelu(const torch::Tensor& x, const torch::Tensor& bias) {
  check_cuda(x, "x");
  check_cuda(bias, "bias");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == x.size(-1), "fused_ops (CUDA): bias must be (C,)");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto bc = bias.to(x.scalar_type()).contiguous();
  auto y = torch::empty_like(xc);
  const int64_t n = xc.numel();
  const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "bias_gelu", [&] {
    bias_gelu_kernel<scalar_t><<<std::max(blocks, 1), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        xc.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n, bc.size(0));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::vector<torch::Tensor> add_layer_norm(const torch::Tensor& x, const torch::Tensor& residual,
                                          const torch::Tensor& weight, const torch::Tensor& bias, double eps) {
  check_cuda(x, "x");
  check_cuda(residual, "residual");
  const int64_t C = x.size(-1);
  TORCH_CHECK(C <= kThreads * kMaxPerThread, "fused_ops (CUDA): rows of at most ", kThreads * kMaxPerThread,
              " elements, got ", C);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto rc = residual.contiguous();
  const auto wc = weight.to(x.scalar_type()).contiguous();
  const auto bc = bias.to(x.scalar_type()).contiguous();
  auto s = torch::empty_like(xc);
  auto y = torch::empty_like(xc);
  const int64_t rows = xc.numel() / C;
  if (rows == 0) return {s, y};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "add_layer_norm", [&] {
    add_layer_norm_kernel<scalar_t><<<rows, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        xc.data_ptr<scalar_t>(), rc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(),
        s.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), C, static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {s, y};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bias_gelu", &bias_gelu, "gelu_tanh(x + bias) in one pass (CUDA)", py::arg("x"), py::arg("bias"));
  m.def("add_layer_norm", &add_layer_norm, "[x + residual, LayerNorm(x + residual)] in one pass (CUDA)",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
}
