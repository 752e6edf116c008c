// Thread runtime of the CPU emulator for `mx.fast.metal_kernel` bodies.
//
// One launch runs every threadgroup of the grid, one after the other, with a team of real
// threads (one std::thread per Metal thread of a threadgroup).  Threadgroup barriers and SIMD
// operations are rendezvous points of that team; a rendezvous that does not complete within
// a time limit (divergent barrier) or that mixes different call sites (divergent SIMD
// operation) aborts the launch with an error instead of hanging or mis-emulating.
//
// This file is included before the Metal keyword macros of metal_stdlib, so it may use the
// standard library freely (`std::thread` would not survive `#define thread`).
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace mxemu {

constexpr unsigned kSimdWidth = 32;
constexpr unsigned kMaxThreadsPerThreadgroup = 1024;
constexpr std::size_t kThreadgroupMemoryLimit = 32768;  // bytes, as on Apple GPUs
constexpr std::size_t kExchangeBytes = 16;              // largest value a SIMD op may carry
constexpr auto kDeadlockTimeout = std::chrono::seconds(20);

struct Uint3 {
  unsigned x, y, z;
};

// Thread-position attributes of one Metal thread (names as in the Metal spec).
struct Attrs {
  Uint3 thread_position_in_grid;
  Uint3 thread_position_in_threadgroup;
  Uint3 threadgroup_position_in_grid;
  Uint3 threads_per_threadgroup;
  Uint3 threadgroups_per_grid;
  Uint3 threads_per_grid;
  unsigned thread_index_in_threadgroup;
  unsigned thread_index_in_simdgroup;
  unsigned simdgroup_index_in_threadgroup;
  unsigned simdgroups_per_threadgroup;
  unsigned thread_index_in_quadgroup;
  unsigned quadgroup_index_in_threadgroup;
  unsigned quadgroups_per_threadgroup;
};

// Raised inside a thread to abort the launch; the first message wins.
struct Abort : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Team;

// A rendezvous among `members` threads, of which `live` have not yet returned from the kernel.
// Every arriving thread deposits a value and a call-site tag; the last one snapshots all values,
// checks that all tags agree, and releases the others.
class Rendezvous {
 public:
  void reset(unsigned members) {
    members_ = members;
    live_ = members;
    arrived_ = 0;
    std::fill(std::begin(present_), std::end(present_), false);
  }

  // Returns the snapshot of every participant's value (indexed by member) and who took part.
  void exchange(Team& team, unsigned member, const void* value, std::size_t bytes, unsigned site,
                const char* what, unsigned char (*out)[kExchangeBytes], bool* out_present);

  // The calling thread returned from the kernel: it no longer takes part.
  void drop(Team& team);

  std::mutex mutex;
  std::condition_variable cv;

 private:
  void complete_locked(Team& team);

  unsigned members_ = 0, live_ = 0, arrived_ = 0;
  std::uint64_t generation_ = 0;
  unsigned site_ = 0;
  const char* what_ = "";
  bool site_set_ = false;
  std::string mismatch_;
  // Slots for up to one threadgroup (barrier) or one simdgroup (SIMD ops).
  std::vector<std::array<unsigned char, kExchangeBytes>> slots_ =
      std::vector<std::array<unsigned char, kExchangeBytes>>(kMaxThreadsPerThreadgroup);
  std::vector<std::array<unsigned char, kExchangeBytes>> snapshot_ =
      std::vector<std::array<unsigned char, kExchangeBytes>>(kMaxThreadsPerThreadgroup);
  bool present_[kMaxThreadsPerThreadgroup] = {};
  bool snapshot_present_[kMaxThreadsPerThreadgroup] = {};
};

// The threads running one threadgroup at a time, and its threadgroup memory.
class Team {
 public:
  Team(unsigned size) : size_(size), simdgroups_((size + kSimdWidth - 1) / kSimdWidth) {
    for (auto& sg : simdgroups_) sg = std::make_unique<Rendezvous>();
    arena_.resize(kThreadgroupMemoryLimit);
    start_group();
  }

  void start_group() {
    barrier_.reset(size_);
    for (unsigned s = 0; s < simdgroups_.size(); ++s) {
      simdgroups_[s]->reset(std::min(kSimdWidth, size_ - s * kSimdWidth));
    }
    // Poison threadgroup memory: all-ones bytes read back as NaN, so a read of memory that no
    // thread wrote shows up in the outputs.
    std::fill(arena_.begin(), arena_.end(), 0xFF);
  }

  void* threadgroup_alloc(std::size_t bytes, std::size_t align, int id) {
    std::lock_guard<std::mutex> lock(alloc_mutex_);
    auto it = allocations_.find(id);
    if (it != allocations_.end()) return arena_.data() + it->second;
    std::size_t offset = (arena_used_ + align - 1) / align * align;
    if (offset + bytes > kThreadgroupMemoryLimit) {
      throw Abort("threadgroup memory exceeds the 32 KiB Apple GPUs allow (" +
                  std::to_string(offset + bytes) + " bytes)");
    }
    arena_used_ = offset + bytes;
    allocations_[id] = offset;
    return arena_.data() + offset;
  }

  void fail(const std::string& message) {
    {
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (!failed_.load()) error_ = message;
      failed_.store(true);
    }
    wake_all();
  }

  void wake_all() {
    { std::lock_guard<std::mutex> lock(barrier_.mutex); }
    barrier_.cv.notify_all();
    for (auto& sg : simdgroups_) {
      { std::lock_guard<std::mutex> lock(sg->mutex); }
      sg->cv.notify_all();
    }
    { std::lock_guard<std::mutex> lock(end_mutex_); }
    end_cv_.notify_all();
  }

  bool failed() const { return failed_.load(); }
  std::string error() {
    std::lock_guard<std::mutex> lock(error_mutex_);
    return error_;
  }

  // Every thread calls this after the kernel returned for the current threadgroup; the last one
  // resets the team for the next threadgroup.
  void end_group() {
    std::unique_lock<std::mutex> lock(end_mutex_);
    std::uint64_t generation = end_generation_;
    if (++end_arrived_ == size_) {
      end_arrived_ = 0;
      start_group();
      ++end_generation_;
      end_cv_.notify_all();
      return;
    }
    end_cv_.wait(lock, [&] { return end_generation_ != generation || failed(); });
    if (failed()) throw Abort("aborted");
  }

  Rendezvous& barrier() { return barrier_; }
  Rendezvous& simdgroup(unsigned index) { return *simdgroups_[index]; }

 private:
  unsigned size_;
  Rendezvous barrier_;
  std::vector<std::unique_ptr<Rendezvous>> simdgroups_;
  std::vector<unsigned char> arena_;
  std::size_t arena_used_ = 0;
  std::map<int, std::size_t> allocations_;
  std::mutex alloc_mutex_, error_mutex_, end_mutex_;
  std::condition_variable end_cv_;
  unsigned end_arrived_ = 0;
  std::uint64_t end_generation_ = 0;
  std::atomic<bool> failed_{false};
  std::string error_;
};

inline void Rendezvous::exchange(Team& team, unsigned member, const void* value, std::size_t bytes,
                                 unsigned site, const char* what,
                                 unsigned char (*out)[kExchangeBytes], bool* out_present) {
  std::unique_lock<std::mutex> lock(mutex);
  if (team.failed()) throw Abort("aborted");
  if (!site_set_) {
    site_ = site;
    what_ = what;
    site_set_ = true;
  } else if (site_ != site || std::strcmp(what_, what) != 0) {
    mismatch_ = std::string("divergent control flow: threads met at ") + what_ + " (line " +
                std::to_string(site_) + ") and " + what + " (line " + std::to_string(site) +
                "); the emulator requires every live thread of the group to reach the same " +
                "barrier or SIMD operation";
  }
  if (bytes) std::memcpy(slots_[member].data(), value, bytes);
  present_[member] = true;
  std::uint64_t generation = generation_;
  if (++arrived_ == live_) {
    complete_locked(team);
  } else if (!cv.wait_for(lock, kDeadlockTimeout,
                          [&] { return generation_ != generation || team.failed(); })) {
    lock.unlock();
    team.fail(std::string("deadlock: ") + what + " (line " + std::to_string(site) +
              ") waited too long for the rest of its group (a divergent barrier?)");
    throw Abort("aborted");
  }
  if (team.failed()) throw Abort("aborted");
  if (out) {
    for (unsigned m = 0; m < members_; ++m) {
      std::memcpy(out[m], snapshot_[m].data(), kExchangeBytes);
      out_present[m] = snapshot_present_[m];
    }
  }
}

inline void Rendezvous::complete_locked(Team& team) {
  for (unsigned m = 0; m < members_; ++m) {
    snapshot_[m] = slots_[m];
    snapshot_present_[m] = present_[m];
    present_[m] = false;
  }
  arrived_ = 0;
  site_set_ = false;
  ++generation_;
  if (!mismatch_.empty()) {
    std::string message = mismatch_;
    mismatch_.clear();
    cv.notify_all();
    mutex.unlock();
    team.fail(message);
    mutex.lock();
    return;
  }
  cv.notify_all();
}

inline void Rendezvous::drop(Team& team) {
  std::unique_lock<std::mutex> lock(mutex);
  --live_;
  if (live_ > 0 && arrived_ == live_) complete_locked(team);
}

// Per-thread context used by the Metal functions of metal_stdlib.
struct Context {
  Team* team;
  unsigned thread_index;
  unsigned lane;
  unsigned simdgroup;
};

inline thread_local Context* current = nullptr;

inline Context& context() {
  if (!current) throw std::logic_error("Metal function called outside an emulated kernel");
  return *current;
}

inline void* threadgroup_alloc(std::size_t bytes, std::size_t align, int id) {
  return context().team->threadgroup_alloc(bytes, align, id);
}

inline void threadgroup_barrier_impl(unsigned site) {
  Context& c = context();
  c.team->barrier().exchange(*c.team, c.thread_index, nullptr, 0, site, "threadgroup_barrier",
                             nullptr, nullptr);
}

// Exchanges `value` among the live lanes of the calling simdgroup; returns this lane's index.
template <typename T>
unsigned simd_exchange(const T& value, unsigned site, const char* what,
                       unsigned char (*values)[kExchangeBytes], bool* present) {
  static_assert(sizeof(T) <= kExchangeBytes, "SIMD operation on a type wider than 16 bytes");
  static_assert(std::is_trivially_copyable_v<T>, "SIMD operation on a non-trivial type");
  Context& c = context();
  c.team->simdgroup(c.simdgroup).exchange(*c.team, c.lane, &value, sizeof(T), site, what, values,
                                          present);
  return c.lane;
}

// Runs `kernel(attrs)` for every thread of the grid; returns 0, or 1 with `error` filled.
inline int run_grid(const unsigned* grid, const unsigned* group, char* error, int error_size,
                    const std::function<void(const Attrs&)>& kernel) {
  const unsigned tx = group[0], ty = group[1], tz = group[2];
  const unsigned size = tx * ty * tz;
  const unsigned gx = grid[0] / tx, gy = grid[1] / ty, gz = grid[2] / tz;
  Team team(size);
  auto body = [&](unsigned thread_index) {
    Attrs a{};
    a.thread_index_in_threadgroup = thread_index;
    a.thread_position_in_threadgroup = {thread_index % tx, (thread_index / tx) % ty,
                                        thread_index / (tx * ty)};
    a.threads_per_threadgroup = {tx, ty, tz};
    a.threadgroups_per_grid = {gx, gy, gz};
    a.threads_per_grid = {grid[0], grid[1], grid[2]};
    a.thread_index_in_simdgroup = thread_index % kSimdWidth;
    a.simdgroup_index_in_threadgroup = thread_index / kSimdWidth;
    a.simdgroups_per_threadgroup = (size + kSimdWidth - 1) / kSimdWidth;
    a.thread_index_in_quadgroup = thread_index % 4;
    a.quadgroup_index_in_threadgroup = thread_index / 4;
    a.quadgroups_per_threadgroup = (size + 3) / 4;
    Context ctx{&team, thread_index, a.thread_index_in_simdgroup, a.simdgroup_index_in_threadgroup};
    current = &ctx;
    try {
      for (unsigned z = 0; z < gz; ++z) {
        for (unsigned y = 0; y < gy; ++y) {
          for (unsigned x = 0; x < gx; ++x) {
            a.threadgroup_position_in_grid = {x, y, z};
            const Uint3& local = a.thread_position_in_threadgroup;
            a.thread_position_in_grid = {x * tx + local.x, y * ty + local.y, z * tz + local.z};
            kernel(a);
            team.barrier().drop(team);
            team.simdgroup(ctx.simdgroup).drop(team);
            team.end_group();
          }
        }
      }
    } catch (const Abort& e) {
      team.fail(e.what());
    } catch (const std::exception& e) {
      team.fail(std::string("exception in kernel: ") + e.what());
    }
    current = nullptr;
  };
  std::vector<std::thread> threads;
  threads.reserve(size);
  for (unsigned t = 0; t < size; ++t) threads.emplace_back(body, t);
  for (auto& t : threads) t.join();
  if (team.failed()) {
    std::snprintf(error, error_size, "%s", team.error().c_str());
    return 1;
  }
  return 0;
}

}  // namespace mxemu
