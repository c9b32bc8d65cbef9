// Communicator interface: the only way ranks exchange data.
//
// Contract:
// - Every rank of a communicator calls the same collectives, in the same order, with the same
//   counts, types and roots. Violations are undefined (typically a hang that the timeout turns
//   into an abort), never silently wrong on purpose.
// - Calls are ordered with respect to each other and, for device buffers, to the communicator's
//   stream. They are not necessarily complete on return: a buffer may be read or written until
//   synchronize() returns (or a later call on the same stream consumes it). The MPI and
//   single-process backends complete before returning; the NCCL backend enqueues on its stream.
// - Buffers may be host or device memory (backends find out); in-place calls pass the same pointer
//   as send and receive where the signature allows.
// - Counts are elements, not bytes; zero counts are legal and move nothing.
// Public methods check arguments once and call the backend's virtual *_impl.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace peerless {

enum class DType { f32, f64, i32, i64, u8 };
enum class ReduceOp { sum, max, min };

size_t dtype_size(DType t);
const char* dtype_name(DType t);

// What one rank handed to each kind of collective since its communicator was made: calls, payload
// bytes (the buffer sizes) and the bytes this rank sends under the bandwidth-optimal ring algorithms
// that NCCL and Open MPI use for large messages: all-reduce 2(W−1)/W·n, reduce-scatter and
// all-gather (W−1)/W·n of the whole n-byte result, all-to-all the blocks addressed to other ranks,
// broadcast n (a pipelined chain: every rank but the last forwards the message). The training
// planner (launch/plan.h) predicts the same quantities; the trainer prints them measured.
enum class Collective { all_reduce, reduce_scatter, all_gather, all_to_all, broadcast, kCount };
const char* collective_name(Collective c);
struct CommCounter {
  int64_t calls = 0;
  double payload = 0, sent = 0;
};
struct CommTraffic {
  CommCounter by_kind[static_cast<int>(Collective::kCount)];
  CommCounter& operator[](Collective c) { return by_kind[static_cast<int>(c)]; }
  const CommCounter& operator[](Collective c) const { return by_kind[static_cast<int>(c)]; }
  CommTraffic& operator+=(const CommTraffic& o);
  CommTraffic operator-(const CommTraffic& o) const;
};

class Comm {
 public:
  virtual ~Comm() = default;
  int rank() const { return rank_; }
  int size() const { return size_; }
  virtual std::string backend_name() const = 0;

  // In place: buf (count) ← reduction over ranks of buf.
  void all_reduce(void* buf, int64_t count, DType type, ReduceOp op = ReduceOp::sum);
  // send (size·recv_count), rank r receives the reduction of block r: recv (recv_count).
  void reduce_scatter(const void* send, void* recv, int64_t recv_count, DType type, ReduceOp op = ReduceOp::sum);
  // send (send_count) from every rank → recv (size·send_count) in rank order. send may equal
  // recv + rank·send_count (in place).
  void all_gather(const void* send, void* recv, int64_t send_count, DType type);
  // Personalised exchange: send_counts[r] elements at send_offsets[r] go to rank r, and
  // recv_counts[r] elements from rank r land at recv_offsets[r]. Each vector has size() entries.
  void all_to_all_v(const void* send, const std::vector<int64_t>& send_counts, const std::vector<int64_t>& send_offsets,
                    void* recv, const std::vector<int64_t>& recv_counts, const std::vector<int64_t>& recv_offsets,
                    DType type);
  // buf (count) on every rank ← root's buf.
  void broadcast(void* buf, int64_t count, DType type, int root);
  void barrier();
  // Waits until every call issued so far has completed.
  void synchronize();
  // Ranks with the same color form a new communicator, ordered by (key, old rank). Collective.
  std::unique_ptr<Comm> split(int color, int key);
  const CommTraffic& traffic() const { return traffic_; }

 protected:
  Comm(int rank, int size) : rank_(rank), size_(size) {}
  virtual void all_reduce_impl(void* buf, int64_t count, DType type, ReduceOp op) = 0;
  virtual void reduce_scatter_impl(const void* send, void* recv, int64_t recv_count, DType type, ReduceOp op) = 0;
  virtual void all_gather_impl(const void* send, void* recv, int64_t send_count, DType type) = 0;
  virtual void all_to_all_v_impl(const void* send, const std::vector<int64_t>& send_counts,
                                 const std::vector<int64_t>& send_offsets, void* recv,
                                 const std::vector<int64_t>& recv_counts, const std::vector<int64_t>& recv_offsets,
                                 DType type) = 0;
  virtual void broadcast_impl(void* buf, int64_t count, DType type, int root) = 0;
  virtual void barrier_impl() = 0;
  virtual void synchronize_impl() {}
  virtual std::unique_ptr<Comm> split_impl(int color, int key) = 0;

 private:
  void count(Collective c, double payload, double sent);
  int rank_, size_;
  CommTraffic traffic_;
};

// One process, world size 1: every collective copies send to receive (or does nothing in place).
std::unique_ptr<Comm> make_single_comm();

}  // namespace peerless
