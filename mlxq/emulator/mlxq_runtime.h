// Interface between generated kernel code (metal_shim.h) and the fiber runtime (runtime.cpp).
#pragma once
#include <stddef.h>
#include <stdint.h>

extern "C" {

// Everything a GPU thread can ask about its position (MLX's 20 attribute parameters derive from it).
struct mlxq_thread_info {
  uint32_t pos_in_grid[3];
  uint32_t tg_pos[3];            // threadgroup_position_in_grid
  uint32_t pos_in_tg[3];
  uint32_t tg_size[3];           // actual size of this threadgroup (smaller at a non-uniform edge)
  uint32_t dispatch_tg_size[3];  // threadgroup size given at dispatch (clamped to the grid like MLX)
  uint32_t tgs_per_grid[3];
  uint32_t grid[3];
  uint32_t index_in_tg;
  uint32_t simd_lane;
  uint32_t simd_group;
  uint32_t threads_in_tg;
  uint32_t dispatch_threads_in_tg;
};

typedef void (*mlxq_thread_fn)(void* const* bufs, const mlxq_thread_info* t);

struct mlxq_launch_desc {
  void* const* bufs;
  uint32_t grid[3];
  uint32_t threadgroup[3];
  int32_t use_fibers;      // 0: the kernel has no barriers/SIMD ops, run threads as a plain loop
  int32_t n_workers;       // OS threads to spread threadgroups over
  uint64_t stack_bytes;    // per fiber
  const char* kernel_name;
  int32_t first_body_line; // line of the body's first line in the MLX text (for messages)
};
}

namespace mlxq_rt {

constexpr uint32_t kSimdWidth = 32;
constexpr uint32_t kSlotBytes = 64;  // largest value a SIMD op exchanges

// Values of the lanes that took part in one SIMD op: slot(lane) is valid where active has the bit.
struct SimdView {
  const unsigned char* slots;
  uint32_t active;
  uint32_t lane;
  const void* slot(uint32_t l) const { return slots + l * kSlotBytes; }
};

SimdView simd_exchange(const void* value, uint32_t bytes, uint32_t site);
void threadgroup_barrier(uint32_t site);
uint64_t threadgroup_generation();       // changes at every threadgroup launch on this OS thread
const mlxq_thread_info* current_thread(); // the GPU thread running on this OS thread
void report_error(const char* message);  // first error wins; the launch then fails
void report_out_of_bounds(const char* buffer, int64_t byte_offset, uint64_t access_bytes, uint64_t buffer_bytes);
// Storage of the threadgroup variable with this id for the current threadgroup: the same pointer for
// all its threads, filled with 0xFF bytes when the group first touches it (so unwritten reads show).
void* threadgroup_alloc(uint32_t id, uint64_t bytes, uint64_t align);
int launch(const mlxq_launch_desc* desc, mlxq_thread_fn fn);
const char* last_error();

}  // namespace mlxq_rt
