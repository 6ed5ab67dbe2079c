// The CUDA runtime calls the launchers make, answered as an H100/H200 would (132 SMs).
#include "emu.h"

extern "C" {
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  *value = attribute == cudaDevAttrMultiProcessorCount ? 132
           : attribute == cudaDevAttrMaxThreadsPerMultiProcessor ? 2048 : 0;
  return cudaSuccess;
}
cudaError_t cudaGetLastError() { return cudaSuccess; }
}
