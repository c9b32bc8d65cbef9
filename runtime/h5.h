// Small RAII layer over the HDF5 C API, shared by the token data files and the checkpoints.
// Every hid_t lives in a move-only `h5::Handle` that closes itself with the right H5*close; every
// negative return becomes a peerless::Error of kind io naming the file and the object, and HDF5's
// own error-stack printing is switched off so that users see one clear message, not a C stack dump.
// Only what the project needs is here: files, groups, scalar attributes (string, integer, float),
// 1-D datasets (optionally chunked), hyperslab reads of 1-D ranges, whole N-d datasets (model files), text stored as a dataset, and
// 1-D virtual datasets (VDS) that present pieces of datasets in other files as one dataset.
#pragma once

#include <hdf5.h>

#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace peerless::h5 {

// Which H5*close releases a handle.
enum class HandleKind { file, group, dataset, dataspace, datatype, attribute, plist };

class Handle {
 public:
  Handle() = default;
  Handle(hid_t id, HandleKind kind) : id_(id), kind_(kind) {}
  ~Handle() { reset(); }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  Handle(Handle&& other) noexcept : id_(other.id_), kind_(other.kind_) { other.id_ = H5I_INVALID_HID; }
  Handle& operator=(Handle&& other) noexcept;

  hid_t get() const { return id_; }
  operator hid_t() const { return id_; }  // NOLINT: lets a Handle be passed wherever a hid_t is
  bool valid() const { return id_ >= 0; }
  // Closes now; closing errors are ignored (they cannot be acted upon in a destructor either).
  void reset();

 private:
  hid_t id_ = H5I_INVALID_HID;
  HandleKind kind_ = HandleKind::file;
};

// Switches off HDF5's automatic error printing (idempotent; every function below calls it).
void silence_errors();

// "file.h5:/train/tokens" for any open object, for error messages.
std::string describe(hid_t obj);

// Throws ErrorKind::io "HDF5 failed to <what> (<where>)" when `status` is negative; returns it otherwise.
int64_t check(int64_t status, const std::string& what, const std::string& where);

enum class Access { read_only, read_write };

// Creates (truncating) or opens a file. Errors name the path and the likely cause.
Handle create_file(const std::string& path);
Handle open_file(const std::string& path, Access access = Access::read_only);
// True when `path` starts with the HDF5 signature (cheap check before opening).
bool is_hdf5(const std::string& path);

Handle create_group(hid_t loc, const std::string& name);
Handle open_group(hid_t loc, const std::string& name);
Handle open_dataset(hid_t loc, const std::string& name);
// True when the link `name` (one level, or a path whose parents exist) exists under `loc`.
bool exists(hid_t loc, const std::string& name);

// Scalar attributes on any object. Writing replaces an existing attribute of the same name.
bool has_attr(hid_t obj, const std::string& name);
void write_attr(hid_t obj, const std::string& name, const std::string& value);
void write_attr(hid_t obj, const std::string& name, const char* value);
void write_attr(hid_t obj, const std::string& name, int64_t value);
void write_attr(hid_t obj, const std::string& name, double value);
// Readers check the attribute's class and throw ErrorKind::data naming object and attribute when it
// is missing or of another kind.
std::string read_string_attr(hid_t obj, const std::string& name);
int64_t read_int_attr(hid_t obj, const std::string& name);
double read_float_attr(hid_t obj, const std::string& name);

// Element types of 1-D datasets. The file type is the little-endian standard type of the same width.
enum class Dtype { u8, u16, u32, i32, i64, f32, f64 };
const char* dtype_name(Dtype dtype);  // "uint16", ...

template <typename T>
constexpr Dtype dtype_of() {
  if constexpr (std::is_same_v<T, uint8_t>) return Dtype::u8;
  else if constexpr (std::is_same_v<T, uint16_t>) return Dtype::u16;
  else if constexpr (std::is_same_v<T, uint32_t>) return Dtype::u32;
  else if constexpr (std::is_same_v<T, int32_t>) return Dtype::i32;
  else if constexpr (std::is_same_v<T, int64_t>) return Dtype::i64;
  else if constexpr (std::is_same_v<T, float>) return Dtype::f32;
  else if constexpr (std::is_same_v<T, double>) return Dtype::f64;
  else static_assert(sizeof(T) == 0, "no HDF5 element type for this C++ type");
}

// Writes a 1-D dataset. chunk > 0 stores it chunked by that many elements (capped at the length;
// an empty dataset is always contiguous, since HDF5 rejects zero-sized chunks).
void write_1d(hid_t loc, const std::string& name, Dtype dtype, const void* data, int64_t n, int64_t chunk = 0);
template <typename T>
void write_1d(hid_t loc, const std::string& name, std::span<const T> data, int64_t chunk = 0) {
  write_1d(loc, name, dtype_of<T>(), data.data(), static_cast<int64_t>(data.size()), chunk);
}

// Writes a dataset of shape `dims` (row-major, any rank ≥ 1; the product is the element count).
void write_nd(hid_t loc, const std::string& name, Dtype dtype, const void* data, const std::vector<int64_t>& dims);
// Shape and element type of a dataset of any rank.
struct DatasetShape {
  std::vector<int64_t> dims;
  int64_t numel = 0;
  Dtype dtype = Dtype::u8;
};
DatasetShape dataset_shape(hid_t loc, const std::string& name);
// Reads a whole dataset of any rank (numel elements, checked against the file) converting to dtype.
void read_all(hid_t loc, const std::string& name, Dtype dtype, int64_t numel, void* out);

// Writes a 1-D dataset of n elements from pieces of memory, each landing at its offset (pieces
// must cover [0, n)); no staging copy of scattered ranges.
struct WritePiece {
  const void* data = nullptr;
  int64_t offset = 0, count = 0;
};
void write_1d_pieces(hid_t loc, const std::string& name, Dtype dtype, int64_t n, const std::vector<WritePiece>& pieces,
                     int64_t chunk = 0);

// Shape and element type of a 1-D dataset; ErrorKind::data if it is not 1-D or of another type.
struct DatasetInfo {
  int64_t length = 0;
  Dtype dtype = Dtype::u8;
};
DatasetInfo dataset_info(hid_t loc, const std::string& name);

// Reads elements [offset, offset + n) of a 1-D dataset, converting to `dtype` in memory (HDF5
// converts between integer widths; values that do not fit are clipped, so read in the file's own
// type when that matters). Bounds are checked and named in the error.
void read_1d_range(hid_t loc, const std::string& name, Dtype dtype, int64_t offset, int64_t n, void* out);
template <typename T>
void read_1d_range(hid_t loc, const std::string& name, int64_t offset, std::span<T> out) {
  read_1d_range(loc, name, dtype_of<T>(), offset, static_cast<int64_t>(out.size()), out.data());
}
template <typename T>
std::vector<T> read_1d(hid_t loc, const std::string& name) {
  std::vector<T> out(static_cast<size_t>(dataset_info(loc, name).length));
  read_1d_range(loc, name, dtype_of<T>(), 0, static_cast<int64_t>(out.size()), out.data());
  return out;
}

// A 1-D virtual dataset of `length` elements whose ranges come from 1-D datasets of other files
// (checkpoint indexes: one global tensor assembled from the ranks' shards). Source file names are
// stored as given; relative names resolve against the virtual dataset's own directory, so a
// directory of files can be moved or renamed as a whole. Elements no piece covers read as the
// fill value: NaN for floats, all bits set for integers (an invalid 2-bit ternary code), so that a
// missing piece never reads as plausible zeros.
struct VirtualPiece {
  std::string file, dataset;  // source
  int64_t src_offset = 0, dst_offset = 0, count = 0;
};
void write_virtual_1d(hid_t loc, const std::string& name, Dtype dtype, int64_t length,
                      const std::vector<VirtualPiece>& pieces);
// Opens or creates every group along "a/b/c" under loc and returns the innermost.
Handle ensure_groups(hid_t loc, const std::string& path);
// Names of the links directly under a group, in name order.
std::vector<std::string> list_children(hid_t group);
// True when `name` under loc is a group (false for datasets and missing links).
bool is_group(hid_t loc, const std::string& name);

// Arbitrary text (may be megabytes, may hold any bytes) as a scalar fixed-length string dataset,
// which h5dump prints as text. Attributes are limited to 64 KiB, hence datasets for big text.
void write_text(hid_t loc, const std::string& name, const std::string& text);
std::string read_text(hid_t loc, const std::string& name);

}  // namespace peerless::h5
