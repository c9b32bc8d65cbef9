// HDF5 wrappers: handle closing, error translation and the few typed reads and writes peerless uses.
#include "runtime/h5.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <mutex>

#include "runtime/error.h"

namespace peerless::h5 {

Handle& Handle::operator=(Handle&& other) noexcept {
  if (this != &other) {
    reset();
    id_ = other.id_;
    kind_ = other.kind_;
    other.id_ = H5I_INVALID_HID;
  }
  return *this;
}

void Handle::reset() {
  if (id_ < 0) return;
  switch (kind_) {
    case HandleKind::file: H5Fclose(id_); break;
    case HandleKind::group: H5Gclose(id_); break;
    case HandleKind::dataset: H5Dclose(id_); break;
    case HandleKind::dataspace: H5Sclose(id_); break;
    case HandleKind::datatype: H5Tclose(id_); break;
    case HandleKind::attribute: H5Aclose(id_); break;
    case HandleKind::plist: H5Pclose(id_); break;
  }
  id_ = H5I_INVALID_HID;
}

void silence_errors() {
  static std::once_flag once;
  std::call_once(once, [] { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); });
}

std::string describe(hid_t obj) {
  char file[4096] = {0};
  char name[4096] = {0};
  if (H5Fget_name(obj, file, sizeof(file)) < 0) std::strcpy(file, "?");
  if (H5Iget_name(obj, name, sizeof(name)) < 0) std::strcpy(name, "?");
  return cat(file, ":", name);
}

int64_t check(int64_t status, const std::string& what, const std::string& where) {
  if (status < 0) PL_FAIL(io, "HDF5 failed to ", what, " (", where, ")");
  return status;
}

namespace {

std::string child(hid_t loc, const std::string& name) {
  std::string base = describe(loc);
  if (!base.empty() && base.back() != '/') base += '/';
  return base + name;
}

hid_t file_type(Dtype dtype) {
  switch (dtype) {
    case Dtype::u8: return H5T_STD_U8LE;
    case Dtype::u16: return H5T_STD_U16LE;
    case Dtype::u32: return H5T_STD_U32LE;
    case Dtype::i32: return H5T_STD_I32LE;
    case Dtype::i64: return H5T_STD_I64LE;
    case Dtype::f32: return H5T_IEEE_F32LE;
    case Dtype::f64: return H5T_IEEE_F64LE;
  }
  return H5T_STD_U8LE;
}

hid_t mem_type(Dtype dtype) {
  switch (dtype) {
    case Dtype::u8: return H5T_NATIVE_UINT8;
    case Dtype::u16: return H5T_NATIVE_UINT16;
    case Dtype::u32: return H5T_NATIVE_UINT32;
    case Dtype::i32: return H5T_NATIVE_INT32;
    case Dtype::i64: return H5T_NATIVE_INT64;
    case Dtype::f32: return H5T_NATIVE_FLOAT;
    case Dtype::f64: return H5T_NATIVE_DOUBLE;
  }
  return H5T_NATIVE_UINT8;
}

Handle open_attr(hid_t obj, const std::string& name, H5T_class_t want, const char* want_name) {
  silence_errors();
  PL_CHECK(has_attr(obj, name), data, "HDF5 attribute '", name, "' is missing on ", describe(obj),
           " (was the file written by another program or an older peerless?)");
  Handle attr(H5Aopen(obj, name.c_str(), H5P_DEFAULT), HandleKind::attribute);
  check(attr, cat("open attribute '", name, "'"), describe(obj));
  Handle type(H5Aget_type(attr), HandleKind::datatype);
  check(type, "get attribute type", describe(obj));
  PL_CHECK(H5Tget_class(type) == want, data, "HDF5 attribute '", name, "' on ", describe(obj), " is not ", want_name);
  return attr;
}

void write_scalar_attr(hid_t obj, const std::string& name, hid_t file_t, hid_t mem_t, const void* value) {
  silence_errors();
  if (has_attr(obj, name)) check(H5Adelete(obj, name.c_str()), cat("replace attribute '", name, "'"), describe(obj));
  Handle space(H5Screate(H5S_SCALAR), HandleKind::dataspace);
  check(space, "create dataspace", describe(obj));
  Handle attr(H5Acreate2(obj, name.c_str(), file_t, space, H5P_DEFAULT, H5P_DEFAULT), HandleKind::attribute);
  check(attr, cat("create attribute '", name, "'"), describe(obj));
  check(H5Awrite(attr, mem_t, value), cat("write attribute '", name, "'"), describe(obj));
}

}  // namespace

bool is_hdf5(const std::string& path) {
  // The signature sits at offset 0 for every file peerless writes (no user block).
  static const unsigned char sig[8] = {0x89, 'H', 'D', 'F', '\r', '\n', 0x1a, '\n'};
  std::ifstream in(path, std::ios::binary);
  unsigned char head[8] = {0};
  if (!in.read(reinterpret_cast<char*>(head), 8)) return false;
  return std::memcmp(head, sig, 8) == 0;
}

Handle create_file(const std::string& path) {
  silence_errors();
  Handle f(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), HandleKind::file);
  PL_CHECK(f.valid(), io, "cannot create HDF5 file '", path,
           "': check that its directory exists and is writable and that no other process holds the file open");
  return f;
}

Handle open_file(const std::string& path, Access access) {
  silence_errors();
  std::ifstream probe(path, std::ios::binary);
  PL_CHECK(probe.good(), io, "cannot open '", path, "': no such file or not readable");
  PL_CHECK(is_hdf5(path), io, "'", path, "' is not an HDF5 file (no HDF5 signature at its start); ",
           "give a file written by peerless, e.g. by `peerless prepare`");
  const unsigned flags = access == Access::read_only ? H5F_ACC_RDONLY : H5F_ACC_RDWR;
  Handle f(H5Fopen(path.c_str(), flags, H5P_DEFAULT), HandleKind::file);
  PL_CHECK(f.valid(), io, "cannot open HDF5 file '", path,
           "': it is corrupt or truncated, or (read-write) locked by another process");
  return f;
}

Handle create_group(hid_t loc, const std::string& name) {
  silence_errors();
  Handle g(H5Gcreate2(loc, name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), HandleKind::group);
  check(g, "create group", child(loc, name));
  return g;
}

Handle open_group(hid_t loc, const std::string& name) {
  silence_errors();
  PL_CHECK(exists(loc, name), data, "HDF5 group '", child(loc, name), "' is missing");
  Handle g(H5Gopen2(loc, name.c_str(), H5P_DEFAULT), HandleKind::group);
  check(g, "open group", child(loc, name));
  return g;
}

Handle open_dataset(hid_t loc, const std::string& name) {
  silence_errors();
  PL_CHECK(exists(loc, name), data, "HDF5 dataset '", child(loc, name), "' is missing");
  Handle d(H5Dopen2(loc, name.c_str(), H5P_DEFAULT), HandleKind::dataset);
  check(d, "open dataset", child(loc, name));
  return d;
}

bool exists(hid_t loc, const std::string& name) {
  silence_errors();
  // H5Lexists fails (rather than returning 0) when an intermediate group is missing, so walk the path.
  std::string prefix;
  size_t pos = 0;
  while (pos <= name.size()) {
    const size_t slash = name.find('/', pos);
    const size_t end = slash == std::string::npos ? name.size() : slash;
    if (end > pos) {
      prefix = name.substr(0, end);
      if (H5Lexists(loc, prefix.c_str(), H5P_DEFAULT) <= 0) return false;
    }
    if (slash == std::string::npos) break;
    pos = slash + 1;
  }
  return true;
}

bool has_attr(hid_t obj, const std::string& name) {
  silence_errors();
  return check(H5Aexists(obj, name.c_str()), cat("look up attribute '", name, "'"), describe(obj)) > 0;
}

void write_attr(hid_t obj, const std::string& name, const std::string& value) {
  // Fixed-length, null-terminated UTF-8: what h5py and h5dump display as a plain string.
  Handle type(H5Tcopy(H5T_C_S1), HandleKind::datatype);
  check(type, "copy string type", describe(obj));
  check(H5Tset_size(type, std::max<size_t>(1, value.size() + 1)), "set string size", describe(obj));
  check(H5Tset_strpad(type, H5T_STR_NULLTERM), "set string padding", describe(obj));
  check(H5Tset_cset(type, H5T_CSET_UTF8), "set string charset", describe(obj));
  write_scalar_attr(obj, name, type, type, value.c_str());
}

void write_attr(hid_t obj, const std::string& name, const char* value) { write_attr(obj, name, std::string(value)); }

void write_attr(hid_t obj, const std::string& name, int64_t value) {
  write_scalar_attr(obj, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &value);
}

void write_attr(hid_t obj, const std::string& name, double value) {
  write_scalar_attr(obj, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &value);
}

std::string read_string_attr(hid_t obj, const std::string& name) {
  Handle attr = open_attr(obj, name, H5T_STRING, "a string");
  Handle type(H5Aget_type(attr), HandleKind::datatype);
  check(type, "get attribute type", describe(obj));
  PL_CHECK(H5Tis_variable_str(type) <= 0, data, "HDF5 attribute '", name, "' on ", describe(obj),
           " is a variable-length string; peerless writes fixed-length strings");
  const size_t size = H5Tget_size(type);
  std::string buf(size, '\0');
  check(H5Aread(attr, type, buf.data()), cat("read attribute '", name, "'"), describe(obj));
  buf.resize(std::strlen(buf.c_str()));  // drop the terminator and any null padding
  return buf;
}

int64_t read_int_attr(hid_t obj, const std::string& name) {
  Handle attr = open_attr(obj, name, H5T_INTEGER, "an integer");
  int64_t value = 0;
  check(H5Aread(attr, H5T_NATIVE_INT64, &value), cat("read attribute '", name, "'"), describe(obj));
  return value;
}

double read_float_attr(hid_t obj, const std::string& name) {
  silence_errors();
  // Integers are accepted too: a float field written as 0 by another tool is still a number.
  PL_CHECK(has_attr(obj, name), data, "HDF5 attribute '", name, "' is missing on ", describe(obj));
  Handle attr(H5Aopen(obj, name.c_str(), H5P_DEFAULT), HandleKind::attribute);
  check(attr, cat("open attribute '", name, "'"), describe(obj));
  Handle type(H5Aget_type(attr), HandleKind::datatype);
  const H5T_class_t cls = H5Tget_class(type);
  PL_CHECK(cls == H5T_FLOAT || cls == H5T_INTEGER, data, "HDF5 attribute '", name, "' on ", describe(obj),
           " is not a number");
  double value = 0;
  check(H5Aread(attr, H5T_NATIVE_DOUBLE, &value), cat("read attribute '", name, "'"), describe(obj));
  return value;
}

const char* dtype_name(Dtype dtype) {
  switch (dtype) {
    case Dtype::u8: return "uint8";
    case Dtype::u16: return "uint16";
    case Dtype::u32: return "uint32";
    case Dtype::i32: return "int32";
    case Dtype::i64: return "int64";
    case Dtype::f32: return "float32";
    case Dtype::f64: return "float64";
  }
  return "?";
}

void write_1d(hid_t loc, const std::string& name, Dtype dtype, const void* data, int64_t n, int64_t chunk) {
  silence_errors();
  const std::string where = child(loc, name);
  const hsize_t dims[1] = {static_cast<hsize_t>(n)};
  Handle space(H5Screate_simple(1, dims, nullptr), HandleKind::dataspace);
  check(space, "create dataspace", where);
  Handle dcpl(H5Pcreate(H5P_DATASET_CREATE), HandleKind::plist);
  check(dcpl, "create property list", where);
  if (chunk > 0 && n > 0) {
    const hsize_t cdims[1] = {static_cast<hsize_t>(std::min(chunk, n))};
    check(H5Pset_chunk(dcpl, 1, cdims), "set chunk size", where);
  }
  Handle ds(H5Dcreate2(loc, name.c_str(), file_type(dtype), space, H5P_DEFAULT, dcpl, H5P_DEFAULT),
            HandleKind::dataset);
  check(ds, "create dataset", where);
  if (n > 0) check(H5Dwrite(ds, mem_type(dtype), H5S_ALL, H5S_ALL, H5P_DEFAULT, data), "write dataset", where);
}

void write_1d_pieces(hid_t loc, const std::string& name, Dtype dtype, int64_t n, const std::vector<WritePiece>& pieces,
                     int64_t chunk) {
  silence_errors();
  const std::string where = child(loc, name);
  const hsize_t dims[1] = {static_cast<hsize_t>(n)};
  Handle space(H5Screate_simple(1, dims, nullptr), HandleKind::dataspace);
  check(space, "create dataspace", where);
  Handle dcpl(H5Pcreate(H5P_DATASET_CREATE), HandleKind::plist);
  check(dcpl, "create property list", where);
  if (chunk > 0 && n > 0) {
    const hsize_t cdims[1] = {static_cast<hsize_t>(std::min(chunk, n))};
    check(H5Pset_chunk(dcpl, 1, cdims), "set chunk size", where);
  }
  Handle ds(H5Dcreate2(loc, name.c_str(), file_type(dtype), space, H5P_DEFAULT, dcpl, H5P_DEFAULT),
            HandleKind::dataset);
  check(ds, "create dataset", where);
  for (const auto& p : pieces) {
    if (p.count == 0) continue;
    PL_CHECK(p.offset >= 0 && p.offset + p.count <= n, internal, "piece [", p.offset, ", ", p.offset + p.count,
             ") outside ", where);
    const hsize_t start[1] = {static_cast<hsize_t>(p.offset)}, count[1] = {static_cast<hsize_t>(p.count)};
    check(H5Sselect_hyperslab(space, H5S_SELECT_SET, start, nullptr, count, nullptr), "select range", where);
    Handle mspace(H5Screate_simple(1, count, nullptr), HandleKind::dataspace);
    check(mspace, "create dataspace", where);
    check(H5Dwrite(ds, mem_type(dtype), mspace, space, H5P_DEFAULT, p.data), "write dataset", where);
  }
}

namespace {
Dtype element_dtype(hid_t ds, const std::string& where) {
  Handle type(H5Dget_type(ds), HandleKind::datatype);
  check(type, "get element type", where);
  const H5T_class_t cls = H5Tget_class(type);
  const size_t size = H5Tget_size(type);
  if (cls == H5T_INTEGER) {
    const bool is_signed = H5Tget_sign(type) == H5T_SGN_2;
    if (!is_signed && size == 1) return Dtype::u8;
    if (!is_signed && size == 2) return Dtype::u16;
    if (!is_signed && size == 4) return Dtype::u32;
    if (is_signed && size == 4) return Dtype::i32;
    if (is_signed && size == 8) return Dtype::i64;
    PL_FAIL(data, "HDF5 dataset ", where, " has an unsupported integer type (", is_signed ? "signed" : "unsigned",
            ", ", size, " bytes)");
  }
  if (cls == H5T_FLOAT && size == 4) return Dtype::f32;
  if (cls == H5T_FLOAT && size == 8) return Dtype::f64;
  PL_FAIL(data, "HDF5 dataset ", where, " has an unsupported element type (class ", static_cast<int>(cls), ", ", size,
          " bytes)");
}
}  // namespace

DatasetShape dataset_shape(hid_t loc, const std::string& name) {
  Handle ds = open_dataset(loc, name);
  const std::string where = child(loc, name);
  Handle space(H5Dget_space(ds), HandleKind::dataspace);
  check(space, "get dataspace", where);
  const int rank = H5Sget_simple_extent_ndims(space);
  PL_CHECK(rank >= 1 && rank <= 8, data, "HDF5 dataset ", where, " has ", rank, " dimensions, expected 1 to 8");
  hsize_t dims[8] = {};
  check(H5Sget_simple_extent_dims(space, dims, nullptr), "get dimensions", where);
  DatasetShape out;
  out.numel = 1;
  for (int i = 0; i < rank; ++i) {
    out.dims.push_back(static_cast<int64_t>(dims[i]));
    out.numel *= static_cast<int64_t>(dims[i]);
  }
  out.dtype = element_dtype(ds, where);
  return out;
}

DatasetInfo dataset_info(hid_t loc, const std::string& name) {
  const DatasetShape shape = dataset_shape(loc, name);
  PL_CHECK(shape.dims.size() == 1, data, "HDF5 dataset ", child(loc, name), " has ", shape.dims.size(),
           " dimensions, expected 1");
  return DatasetInfo{shape.numel, shape.dtype};
}

void write_nd(hid_t loc, const std::string& name, Dtype dtype, const void* data, const std::vector<int64_t>& dims) {
  silence_errors();
  const std::string where = child(loc, name);
  PL_CHECK(!dims.empty() && dims.size() <= 8, internal, "write_nd of ", where, " with ", dims.size(), " dimensions");
  std::vector<hsize_t> hd(dims.begin(), dims.end());
  int64_t n = 1;
  for (int64_t v : dims) n *= v;
  Handle space(H5Screate_simple(static_cast<int>(hd.size()), hd.data(), nullptr), HandleKind::dataspace);
  check(space, "create dataspace", where);
  Handle ds(H5Dcreate2(loc, name.c_str(), file_type(dtype), space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
            HandleKind::dataset);
  check(ds, "create dataset", where);
  if (n > 0) check(H5Dwrite(ds, mem_type(dtype), H5S_ALL, H5S_ALL, H5P_DEFAULT, data), "write dataset", where);
}

void read_all(hid_t loc, const std::string& name, Dtype dtype, int64_t numel, void* out) {
  const std::string where = child(loc, name);
  const DatasetShape shape = dataset_shape(loc, name);
  PL_CHECK(shape.numel == numel, data, "HDF5 dataset ", where, " has ", shape.numel, " elements, expected ", numel);
  if (numel == 0) return;
  Handle ds = open_dataset(loc, name);
  check(H5Dread(ds, mem_type(dtype), H5S_ALL, H5S_ALL, H5P_DEFAULT, out), "read dataset (corrupt file?)", where);
}

void read_1d_range(hid_t loc, const std::string& name, Dtype dtype, int64_t offset, int64_t n, void* out) {
  const std::string where = child(loc, name);
  const int64_t length = dataset_info(loc, name).length;
  PL_CHECK(offset >= 0 && n >= 0 && offset + n <= length, data, "HDF5 read of elements [", offset, ", ", offset + n,
           ") is out of range for ", where, " (", length, " elements)");
  if (n == 0) return;
  Handle ds = open_dataset(loc, name);
  Handle fspace(H5Dget_space(ds), HandleKind::dataspace);
  check(fspace, "get dataspace", where);
  const hsize_t start[1] = {static_cast<hsize_t>(offset)};
  const hsize_t count[1] = {static_cast<hsize_t>(n)};
  check(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, nullptr, count, nullptr), "select range", where);
  Handle mspace(H5Screate_simple(1, count, nullptr), HandleKind::dataspace);
  check(mspace, "create dataspace", where);
  check(H5Dread(ds, mem_type(dtype), mspace, fspace, H5P_DEFAULT, out), "read dataset (corrupt file?)", where);
}

void write_virtual_1d(hid_t loc, const std::string& name, Dtype dtype, int64_t length,
                      const std::vector<VirtualPiece>& pieces) {
  silence_errors();
  const std::string where = child(loc, name);
  const hsize_t dims[1] = {static_cast<hsize_t>(length)};
  Handle vspace(H5Screate_simple(1, dims, nullptr), HandleKind::dataspace);
  check(vspace, "create dataspace", where);
  Handle dcpl(H5Pcreate(H5P_DATASET_CREATE), HandleKind::plist);
  check(dcpl, "create property list", where);
  // Fill value: NaN for floats, all bits set for integers (see the header).
  alignas(8) unsigned char fill[8];
  if (dtype == Dtype::f32) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::memcpy(fill, &nan, sizeof nan);
  } else if (dtype == Dtype::f64) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    std::memcpy(fill, &nan, sizeof nan);
  } else {
    std::memset(fill, 0xFF, sizeof fill);
  }
  check(H5Pset_fill_value(dcpl, mem_type(dtype), fill), "set fill value", where);
  for (const auto& p : pieces) {
    if (p.count == 0) continue;
    PL_CHECK(p.dst_offset >= 0 && p.dst_offset + p.count <= length, internal, "virtual piece [", p.dst_offset, ", ",
             p.dst_offset + p.count, ") outside ", where, " (", length, " elements)");
    const hsize_t dst[1] = {static_cast<hsize_t>(p.dst_offset)}, count[1] = {static_cast<hsize_t>(p.count)};
    check(H5Sselect_hyperslab(vspace, H5S_SELECT_SET, dst, nullptr, count, nullptr), "select virtual range", where);
    // The source dataspace is described by its extent up to the piece's end; HDF5 only needs the
    // selection to fit inside the real source when it reads.
    const hsize_t src_dims[1] = {static_cast<hsize_t>(p.src_offset + p.count)};
    Handle sspace(H5Screate_simple(1, src_dims, nullptr), HandleKind::dataspace);
    check(sspace, "create source dataspace", where);
    const hsize_t src[1] = {static_cast<hsize_t>(p.src_offset)};
    check(H5Sselect_hyperslab(sspace, H5S_SELECT_SET, src, nullptr, count, nullptr), "select source range", where);
    check(H5Pset_virtual(dcpl, vspace, p.file.c_str(), p.dataset.c_str(), sspace),
          cat("map ", p.file, ":", p.dataset, " into the virtual dataset"), where);
  }
  Handle ds(H5Dcreate2(loc, name.c_str(), file_type(dtype), vspace, H5P_DEFAULT, dcpl, H5P_DEFAULT),
            HandleKind::dataset);
  check(ds, "create virtual dataset", where);
}

Handle ensure_groups(hid_t loc, const std::string& path) {
  Handle current;
  hid_t at = loc;
  size_t start = 0;
  while (start < path.size()) {
    const size_t slash = path.find('/', start);
    const std::string name = path.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
    Handle next = exists(at, name) ? open_group(at, name) : create_group(at, name);
    current = std::move(next);
    at = current.get();
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
  return current;
}

std::vector<std::string> list_children(hid_t group) {
  silence_errors();
  H5G_info_t info;
  check(H5Gget_info(group, &info), "list group", describe(group));
  std::vector<std::string> names;
  for (hsize_t i = 0; i < info.nlinks; ++i) {
    const ssize_t len = H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
    check(len, "read link name", describe(group));
    std::string name(static_cast<size_t>(len) + 1, '\0');
    check(H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, name.data(), name.size(), H5P_DEFAULT),
          "read link name", describe(group));
    name.resize(static_cast<size_t>(len));
    names.push_back(name);
  }
  return names;
}

bool is_group(hid_t loc, const std::string& name) {
  silence_errors();
  if (!exists(loc, name)) return false;
  const hid_t obj = H5Oopen(loc, name.c_str(), H5P_DEFAULT);
  check(obj, "open object", child(loc, name));
  const bool group = H5Iget_type(obj) == H5I_GROUP;
  H5Oclose(obj);
  return group;
}

void write_text(hid_t loc, const std::string& name, const std::string& text) {
  silence_errors();
  const std::string where = child(loc, name);
  Handle type(H5Tcopy(H5T_C_S1), HandleKind::datatype);
  check(type, "copy string type", where);
  // NULLPAD keeps every byte (even NUL) and the explicit length attribute makes "" exact.
  check(H5Tset_size(type, std::max<size_t>(1, text.size())), "set string size", where);
  check(H5Tset_strpad(type, H5T_STR_NULLPAD), "set string padding", where);
  check(H5Tset_cset(type, H5T_CSET_UTF8), "set string charset", where);
  Handle space(H5Screate(H5S_SCALAR), HandleKind::dataspace);
  check(space, "create dataspace", where);
  Handle ds(H5Dcreate2(loc, name.c_str(), type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), HandleKind::dataset);
  check(ds, "create text dataset", where);
  std::string buf = text.empty() ? std::string(1, '\0') : text;
  check(H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()), "write text dataset", where);
  write_attr(ds, "length", static_cast<int64_t>(text.size()));
}

std::string read_text(hid_t loc, const std::string& name) {
  const std::string where = child(loc, name);
  Handle ds = open_dataset(loc, name);
  Handle type(H5Dget_type(ds), HandleKind::datatype);
  check(type, "get element type", where);
  PL_CHECK(H5Tget_class(type) == H5T_STRING && H5Tis_variable_str(type) <= 0, data, "HDF5 dataset ", where,
           " is not a fixed-length text dataset");
  const size_t size = H5Tget_size(type);
  std::string buf(size, '\0');
  check(H5Dread(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()), "read text dataset", where);
  const int64_t length = has_attr(ds, "length") ? read_int_attr(ds, "length") : static_cast<int64_t>(size);
  PL_CHECK(length >= 0 && static_cast<size_t>(length) <= size, data, "HDF5 text dataset ", where, " has length ",
           length, " beyond its storage of ", size, " bytes");
  buf.resize(static_cast<size_t>(length));
  return buf;
}

}  // namespace peerless::h5
