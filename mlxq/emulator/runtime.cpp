// Fiber runtime: runs the GPU threads of a launch with Metal's threadgroup and SIMD-group semantics.
//
// One fiber per GPU thread; all fibers of a threadgroup run on one OS thread (so `threadgroup`
// arrays rewritten to `static thread_local` are shared by exactly that group); threadgroups are
// spread over worker threads. A fiber runs until it blocks at a barrier or SIMD op; when no fiber
// of the group can run, the scheduler releases a SIMD op's lanes or a threadgroup barrier, or
// reports a divergent barrier / deadlock.
#include "mlxq_runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) && !defined(MLXQ_UCONTEXT)
#define MLXQ_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

namespace mlxq_rt {
namespace {

enum FiberState { kRunnable, kAtBarrier, kAtSimd, kDone };

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out
  char* stack_lo = nullptr;
  size_t stack_bytes = 0;
#if !MLXQ_ASM_SWITCH
  ucontext_t ctx;
#endif
  mlxq_thread_info info;
  int state = kRunnable;
  uint32_t site = 0;
  uint32_t xbytes = 0;
  alignas(16) unsigned char xvalue[kSlotBytes];
};

struct SimdSlots {
  alignas(16) unsigned char data[kSimdWidth * kSlotBytes];
  uint32_t active = 0;
};

struct Launch {
  const mlxq_launch_desc* desc;
  mlxq_thread_fn fn;
  uint32_t tg[3];
  uint32_t groups[3];
  std::atomic<uint64_t> next_group{0};
  std::atomic<bool> failed{false};
};

struct Worker {
  Launch* launch = nullptr;
  std::vector<Fiber> fibers;
  std::vector<SimdSlots> simd;
  char* stacks = nullptr;
  size_t stacks_bytes = 0;
  void* sched_sp = nullptr;
#if !MLXQ_ASM_SWITCH
  ucontext_t sched_ctx;
#endif
  Fiber* current = nullptr;
  // Threadgroup variables: one arena per worker; each variable id keeps its offset for the launch.
  struct TgVar {
    uint64_t offset = 0, bytes = 0, generation = 0;
  };
  std::vector<TgVar> tg_vars;
  char* tg_arena = nullptr;
  uint64_t tg_used = 0;
  ~Worker() {
    if (stacks) munmap(stacks, stacks_bytes);
    std::free(tg_arena);
  }
};

constexpr uint64_t kTgArenaBytes = 1u << 20;  // Metal allows 32 KiB; leave room for mistakes

thread_local Worker* tl_worker = nullptr;
thread_local const mlxq_thread_info* tl_info = nullptr;
thread_local uint64_t tl_generation = 0;
thread_local uint64_t tl_generation_counter = 0;

std::mutex g_error_mutex;
std::string g_error;
std::atomic<bool> g_error_set{false};
std::atomic<uint64_t> g_oob_count{0};

void set_error(const std::string& message) {
  std::lock_guard<std::mutex> lock(g_error_mutex);
  if (!g_error_set.load()) {
    g_error = message;
    g_error_set.store(true);
  }
}

// ---------------------------------------------------------------- context switch
#if MLXQ_ASM_SWITCH
// switch_stack(save, to): saves callee-saved registers and FP control words on the current stack,
// stores the stack pointer in *save, and resumes the context whose stack pointer is `to`.
extern "C" void mlxq_switch_stack(void** save, void* to);
extern "C" void mlxq_fiber_trampoline();
asm(R"(
.text
.p2align 4
.type mlxq_switch_stack,@function
mlxq_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size mlxq_switch_stack,.-mlxq_switch_stack
.p2align 4
.type mlxq_fiber_trampoline,@function
mlxq_fiber_trampoline:
  movq %r12, %rdi
  call mlxq_fiber_main
  ud2
.size mlxq_fiber_trampoline,.-mlxq_fiber_trampoline
)");
#endif

extern "C" __attribute__((used)) void mlxq_fiber_main(Fiber* f);

void switch_to_fiber(Worker& w, Fiber& f) {
  w.current = &f;
  tl_info = &f.info;
#if MLXQ_ASM_SWITCH
  mlxq_switch_stack(&w.sched_sp, f.sp);
#else
  swapcontext(&w.sched_ctx, &f.ctx);
#endif
}

void switch_to_scheduler(Worker& w, Fiber& f) {
#if MLXQ_ASM_SWITCH
  mlxq_switch_stack(&f.sp, w.sched_sp);
#else
  swapcontext(&f.ctx, &w.sched_ctx);
#endif
}

// Lays out a fresh frame so the next switch into `f` starts mlxq_fiber_main(f).
void reset_fiber(Fiber& f) {
#if MLXQ_ASM_SWITCH
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack_lo) + f.stack_bytes) & ~uintptr_t(15);
  uintptr_t r = top - 16;  // stack pointer after the final `ret`: 16-byte aligned, as before a call
  uint64_t* frame = reinterpret_cast<uint64_t*>(r - 72);
  uint32_t fpctl[2] = {0x1F80, 0x037F};  // default MXCSR and x87 control word
  std::memcpy(frame, fpctl, sizeof(fpctl));
  frame[2] = 0;                                     // r15
  frame[3] = 0;                                     // r14
  frame[4] = 0;                                     // r13
  frame[5] = reinterpret_cast<uint64_t>(&f);        // r12: argument for the trampoline
  frame[6] = 0;                                     // rbx
  frame[7] = 0;                                     // rbp
  frame[8] = reinterpret_cast<uint64_t>(&mlxq_fiber_trampoline);
  f.sp = frame;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack_lo;
  f.ctx.uc_stack.ss_size = f.stack_bytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&mlxq_fiber_main), 1, &f);
#endif
}

void prepare_fibers(Worker& w, size_t count, size_t stack_bytes) {
  if (w.fibers.size() >= count) return;
  size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  stack_bytes = (stack_bytes + page - 1) / page * page;
  size_t slot = stack_bytes + page;  // a guard page below each stack catches overflow
  w.stacks_bytes = slot * count;
  void* mem = mmap(nullptr, w.stacks_bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) {
    w.stacks = nullptr;
    return;
  }
  w.stacks = static_cast<char*>(mem);
  w.fibers = std::vector<Fiber>(count);
  for (size_t i = 0; i < count; ++i) {
    char* base = w.stacks + i * slot;
    mprotect(base, page, PROT_NONE);
    w.fibers[i].stack_lo = base + page;
    w.fibers[i].stack_bytes = stack_bytes;
    reset_fiber(w.fibers[i]);
  }
}

void fill_info(const Launch& L, const uint32_t gpos[3], const uint32_t size[3], uint32_t index,
               mlxq_thread_info& t) {
  const mlxq_launch_desc& d = *L.desc;
  uint32_t lx = index % size[0];
  uint32_t ly = (index / size[0]) % size[1];
  uint32_t lz = index / (size[0] * size[1]);
  uint32_t local[3] = {lx, ly, lz};
  for (int k = 0; k < 3; ++k) {
    t.tg_pos[k] = gpos[k];
    t.pos_in_tg[k] = local[k];
    t.tg_size[k] = size[k];
    t.dispatch_tg_size[k] = L.tg[k];
    t.tgs_per_grid[k] = L.groups[k];
    t.grid[k] = d.grid[k];
    t.pos_in_grid[k] = gpos[k] * L.tg[k] + local[k];
  }
  t.index_in_tg = index;
  t.simd_lane = index % kSimdWidth;
  t.simd_group = index / kSimdWidth;
  t.threads_in_tg = size[0] * size[1] * size[2];
  t.dispatch_threads_in_tg = L.tg[0] * L.tg[1] * L.tg[2];
}

std::string site_text(const Launch& L, uint32_t site) {
  int line = static_cast<int>(site / 1024);
  int body = line - L.desc->first_body_line + 1;
  char buf[96];
  if (L.desc->first_body_line > 0 && body >= 1)
    std::snprintf(buf, sizeof(buf), "body line %d", body);
  else
    std::snprintf(buf, sizeof(buf), "source line %d", line);
  return buf;
}

std::string thread_text(const mlxq_thread_info& t) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), "thread %u (position in grid %u,%u,%u) of threadgroup (%u,%u,%u)",
                t.index_in_tg, t.pos_in_grid[0], t.pos_in_grid[1], t.pos_in_grid[2], t.tg_pos[0],
                t.tg_pos[1], t.tg_pos[2]);
  return buf;
}

void fail(Launch& L, const std::string& what) {
  set_error(std::string("kernel '") + L.desc->kernel_name + "': " + what);
  L.failed.store(true);
}

// Releases one SIMD op per SIMD group with waiting lanes. Returns whether anything was released.
bool release_simd_ops(Worker& w, size_t n) {
  bool released = false;
  size_t groups = (n + kSimdWidth - 1) / kSimdWidth;
  for (size_t s = 0; s < groups; ++s) {
    size_t lo = s * kSimdWidth, hi = lo + kSimdWidth < n ? lo + kSimdWidth : n;
    // Lanes waiting at different SIMD ops diverged. Release the op earliest in the text (lowest
    // line): the lanes there are behind the others, which on a GPU would wait for them to reconverge.
    int first = -1;
    for (size_t i = lo; i < hi; ++i)
      if (w.fibers[i].state == kAtSimd && (first < 0 || w.fibers[i].site < w.fibers[first].site))
        first = static_cast<int>(i);
    if (first < 0) continue;
    uint32_t site = w.fibers[first].site;
    uint32_t bytes = w.fibers[first].xbytes;
    SimdSlots& slots = w.simd[s];
    // Lanes that do not take part read as garbage (0xFF), as an inactive lane would on a GPU.
    for (uint32_t l = 0; l < kSimdWidth; ++l) std::memset(slots.data + l * kSlotBytes, 0xFF, bytes);
    slots.active = 0;
    for (size_t i = lo; i < hi; ++i) {
      Fiber& f = w.fibers[i];
      if (f.state != kAtSimd || f.site != site) continue;
      uint32_t lane = static_cast<uint32_t>(i - lo);
      std::memcpy(slots.data + lane * kSlotBytes, f.xvalue, f.xbytes);
      slots.active |= 1u << lane;
      f.state = kRunnable;
    }
    released = true;
  }
  return released;
}

// All live fibers wait at threadgroup barriers: release them, or report why they never could.
bool release_barrier(Worker& w, Launch& L, size_t n) {
  int waiting = -1, done = -1;
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = w.fibers[i];
    if (f.state == kDone) {
      if (done < 0) done = static_cast<int>(i);
      continue;
    }
    if (waiting < 0) {
      waiting = static_cast<int>(i);
    } else if (f.site != w.fibers[waiting].site) {
      Fiber& a = w.fibers[waiting];
      fail(L, "divergent threadgroup_barrier: " + thread_text(a.info) + " waits at the barrier at " +
                  site_text(L, a.site) + " but " + thread_text(f.info) + " waits at the one at " +
                  site_text(L, f.site));
      return false;
    }
  }
  if (waiting < 0) return false;
  if (done >= 0) {
    Fiber& a = w.fibers[waiting];
    fail(L, "deadlock: " + thread_text(a.info) + " waits at the threadgroup_barrier at " +
                site_text(L, a.site) + " but " + thread_text(w.fibers[done].info) +
                " has returned and will never arrive");
    return false;
  }
  for (size_t i = 0; i < n; ++i) w.fibers[i].state = kRunnable;
  return true;
}

void run_group_with_fibers(Worker& w, Launch& L, const uint32_t gpos[3], const uint32_t size[3]) {
  size_t n = static_cast<size_t>(size[0]) * size[1] * size[2];
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = w.fibers[i];
    fill_info(L, gpos, size, static_cast<uint32_t>(i), f.info);
    f.state = kRunnable;
  }
  for (;;) {
    for (size_t i = 0; i < n; ++i)
      if (w.fibers[i].state == kRunnable) switch_to_fiber(w, w.fibers[i]);
    if (release_simd_ops(w, n)) continue;
    bool all_done = true;
    for (size_t i = 0; i < n; ++i) all_done = all_done && w.fibers[i].state == kDone;
    if (all_done) return;
    if (!release_barrier(w, L, n)) {
      // Abandon the stuck fibers: lay out fresh frames so the pool can be reused.
      for (size_t i = 0; i < n; ++i)
        if (w.fibers[i].state != kDone) reset_fiber(w.fibers[i]);
      return;
    }
  }
}

void run_group_plain(Launch& L, const uint32_t gpos[3], const uint32_t size[3]) {
  mlxq_thread_info t;
  uint32_t n = size[0] * size[1] * size[2];
  tl_info = &t;
  for (uint32_t i = 0; i < n; ++i) {
    fill_info(L, gpos, size, i, t);
    L.fn(L.desc->bufs, &t);
  }
  tl_info = nullptr;
}

void worker_main(Launch& L) {
  Worker w;
  w.launch = &L;
  tl_worker = &w;
  const mlxq_launch_desc& d = *L.desc;
  size_t tg_threads = static_cast<size_t>(L.tg[0]) * L.tg[1] * L.tg[2];
  if (d.use_fibers) {
    prepare_fibers(w, tg_threads, d.stack_bytes);
    if (!w.stacks) {
      fail(L, "could not allocate fiber stacks");
      tl_worker = nullptr;
      return;
    }
    w.simd.resize((tg_threads + kSimdWidth - 1) / kSimdWidth);
  }
  uint64_t total = static_cast<uint64_t>(L.groups[0]) * L.groups[1] * L.groups[2];
  for (;;) {
    if (L.failed.load(std::memory_order_relaxed) || g_error_set.load(std::memory_order_relaxed)) break;
    uint64_t g = L.next_group.fetch_add(1);
    if (g >= total) break;
    uint32_t gpos[3] = {static_cast<uint32_t>(g % L.groups[0]),
                        static_cast<uint32_t>((g / L.groups[0]) % L.groups[1]),
                        static_cast<uint32_t>(g / (static_cast<uint64_t>(L.groups[0]) * L.groups[1]))};
    uint32_t size[3];
    for (int k = 0; k < 3; ++k) {
      uint32_t start = gpos[k] * L.tg[k];
      size[k] = d.grid[k] - start < L.tg[k] ? d.grid[k] - start : L.tg[k];
    }
    tl_generation = ++tl_generation_counter;
    if (d.use_fibers)
      run_group_with_fibers(w, L, gpos, size);
    else
      run_group_plain(L, gpos, size);
  }
  tl_worker = nullptr;
}

}  // namespace

extern "C" void mlxq_fiber_main(Fiber* f) {
  for (;;) {
    Worker& w = *tl_worker;
    w.launch->fn(w.launch->desc->bufs, &f->info);
    f->state = kDone;
    switch_to_scheduler(w, *f);
  }
}

SimdView simd_exchange(const void* value, uint32_t bytes, uint32_t site) {
  Worker* w = tl_worker;
  if (!w || !w->current || !w->launch->desc->use_fibers) {
    report_error("internal: SIMD op outside a fiber (the kernel was not detected as using SIMD ops)");
    static thread_local unsigned char dummy[kSimdWidth * kSlotBytes];
    return SimdView{dummy, 0, 0};
  }
  Fiber& f = *w->current;
  if (bytes > kSlotBytes) bytes = kSlotBytes;
  std::memcpy(f.xvalue, value, bytes);
  f.xbytes = bytes;
  f.site = site;
  f.state = kAtSimd;
  switch_to_scheduler(*w, f);
  const SimdSlots& s = w->simd[f.info.simd_group];
  return SimdView{s.data, s.active, f.info.simd_lane};
}

void threadgroup_barrier(uint32_t site) {
  Worker* w = tl_worker;
  if (!w || !w->current || !w->launch->desc->use_fibers) {
    report_error("internal: barrier outside a fiber (the kernel was not detected as using barriers)");
    return;
  }
  Fiber& f = *w->current;
  f.site = site;
  f.state = kAtBarrier;
  switch_to_scheduler(*w, f);
}

uint64_t threadgroup_generation() { return tl_generation; }

const mlxq_thread_info* current_thread() { return tl_info; }

void report_error(const char* message) {
  std::string text = message;
  if (tl_worker && tl_worker->launch)
    text = std::string("kernel '") + tl_worker->launch->desc->kernel_name + "': " + text;
  set_error(text);
}

void report_out_of_bounds(const char* buffer, int64_t byte_offset, uint64_t access_bytes, uint64_t buffer_bytes) {
  if (g_oob_count.fetch_add(1) > 0) return;
  char buf[512];
  const mlxq_thread_info* t = tl_info;
  std::snprintf(buf, sizeof(buf),
                "out-of-bounds access to buffer '%s': %llu bytes at byte offset %lld (element %lld), "
                "but the buffer has %llu bytes (%llu elements); first by %s",
                buffer, (unsigned long long)access_bytes, (long long)byte_offset,
                (long long)(byte_offset >= 0 ? byte_offset / (int64_t)access_bytes
                                             : -((-byte_offset + (int64_t)access_bytes - 1) / (int64_t)access_bytes)),
                (unsigned long long)buffer_bytes, (unsigned long long)(buffer_bytes / access_bytes),
                t ? thread_text(*t).c_str() : "an unknown thread");
  report_error(buf);
}

void* threadgroup_alloc(uint32_t id, uint64_t bytes, uint64_t align) {
  Worker* w = tl_worker;
  if (!w) return nullptr;
  if (!w->tg_arena) w->tg_arena = static_cast<char*>(std::calloc(1, kTgArenaBytes));
  if (w->tg_vars.size() <= id) w->tg_vars.resize(id + 1);
  Worker::TgVar& v = w->tg_vars[id];
  if (v.bytes == 0) {
    if (align < 16) align = 16;
    uint64_t offset = (w->tg_used + align - 1) / align * align;
    if (offset + bytes > kTgArenaBytes) {
      report_error("threadgroup memory exceeds 1 MiB (Metal allows 32 KiB)");
      static thread_local unsigned char spill[1 << 16];
      return spill;
    }
    v.offset = offset;
    v.bytes = bytes;
    w->tg_used = offset + bytes;
  }
  char* p = w->tg_arena + v.offset;
  if (v.generation != tl_generation) {
    v.generation = tl_generation;
    std::memset(p, 0xFF, v.bytes);
  }
  return p;
}

const char* last_error() { return g_error.c_str(); }

int launch(const mlxq_launch_desc* desc, mlxq_thread_fn fn) {
  {
    std::lock_guard<std::mutex> lock(g_error_mutex);
    g_error.clear();
    g_error_set.store(false);
    g_oob_count.store(0);
  }
  Launch L;
  L.desc = desc;
  L.fn = fn;
  for (int k = 0; k < 3; ++k) {
    L.tg[k] = desc->threadgroup[k] < desc->grid[k] ? desc->threadgroup[k] : desc->grid[k];
    if (L.tg[k] == 0) return 0;  // empty grid: nothing to run
    L.groups[k] = (desc->grid[k] + L.tg[k] - 1) / L.tg[k];
  }
  uint64_t total = static_cast<uint64_t>(L.groups[0]) * L.groups[1] * L.groups[2];
  uint64_t workers = desc->n_workers > 0 ? static_cast<uint64_t>(desc->n_workers) : 1;
  if (workers > total) workers = total;
  if (workers <= 1) {
    worker_main(L);
  } else {
    // Worker threads get stacks large enough for kernels with big local arrays.
    std::vector<std::thread> threads;
    for (uint64_t i = 0; i < workers; ++i) threads.emplace_back([&L] { worker_main(L); });
    for (auto& t : threads) t.join();
  }
  if (g_oob_count.load() > 1) {
    std::lock_guard<std::mutex> lock(g_error_mutex);
    g_error += " (" + std::to_string(g_oob_count.load()) + " out-of-bounds accesses in all)";
  }
  return g_error_set.load() ? 1 : 0;
}

}  // namespace mlxq_rt
