// Qualifiers for math shared by the CUDA kernels and plain C++ (host tests, CPU tools).
// Under nvcc TK_HD is `__host__ __device__`; under a host-only compiler it is empty, so the
// headers in csrc/common/ compile with g++ and can be tested against the Python references.
#pragma once

#if defined(__CUDACC__)
#define TK_HD __host__ __device__ __forceinline__
#define TK_DEVICE __device__ __forceinline__
#else
#define TK_HD inline
#endif
