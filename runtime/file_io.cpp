// MappedFile, AtomicFile and the UTF-8 check (see file_io.h).
#include "runtime/file_io.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "runtime/error.h"

namespace peerless {

// ---- MappedFile ---------------------------------------------------------------------------------

MappedFile::MappedFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  PL_CHECK(fd >= 0, io, "cannot open ", path, ": ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    const int err = errno;
    ::close(fd);
    PL_FAIL(io, "cannot read ", path, ": ", S_ISREG(st.st_mode) ? std::strerror(err) : "not a regular file");
  }
  size_ = static_cast<uint64_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    const int err = errno;
    ::close(fd);
    PL_CHECK(p != MAP_FAILED, io, "cannot map ", path, " (", size_, " bytes): ", std::strerror(err));
    data_ = static_cast<const uint8_t*>(p);
  } else {
    ::close(fd);
  }
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

MappedFile::MappedFile(MappedFile&& other) noexcept : data_(other.data_), size_(other.size_) {
  other.data_ = nullptr;
  other.size_ = 0;
}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
    data_ = other.data_;
    size_ = other.size_;
    other.data_ = nullptr;
    other.size_ = 0;
  }
  return *this;
}

// ---- UTF-8 -------------------------------------------------------------------------------------

bool is_valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len = 0;
    uint32_t cp = 0;
    if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1Fu;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0Fu;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07u;
    } else {
      return false;
    }
    if (s.size() - i < static_cast<size_t>(len)) return false;
    for (int k = 1; k < len; ++k) {
      const auto d = static_cast<unsigned char>(s[i + static_cast<size_t>(k)]);
      if ((d & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3Fu);
    }
    static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};  // overlong forms are invalid
    if (cp < kMin[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += static_cast<size_t>(len);
  }
  return true;
}

// ---- AtomicFile ---------------------------------------------------------------------------------

namespace {
constexpr size_t kWriteBuffer = size_t{1} << 20;

void write_all(int fd, const uint8_t* p, size_t n, const std::string& path) {
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    PL_CHECK(w > 0, io, "cannot write ", path, ": ", w < 0 ? std::strerror(errno) : "no progress");
    p += w;
    n -= static_cast<size_t>(w);
  }
}
}  // namespace

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)), tmp_path_(path_ + ".tmp") {
  fd_ = ::open(tmp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  PL_CHECK(fd_ >= 0, io, "cannot create ", tmp_path_, ": ", std::strerror(errno));
  buffer_.reserve(kWriteBuffer);
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(tmp_path_.c_str());
}

void AtomicFile::flush() {
  write_all(fd_, buffer_.data(), buffer_.size(), tmp_path_);
  buffer_.clear();
}

void AtomicFile::write(const void* data, size_t n) {
  PL_CHECK(fd_ >= 0, internal, "AtomicFile::write after commit (", path_, ")");
  const auto* p = static_cast<const uint8_t*>(data);
  if (buffer_.size() + n > kWriteBuffer) flush();
  if (n >= kWriteBuffer) {
    write_all(fd_, p, n, tmp_path_);
  } else {
    buffer_.insert(buffer_.end(), p, p + n);
  }
  position_ += n;
}

void AtomicFile::write_zeros(size_t n) {
  static const uint8_t zeros[4096] = {};
  while (n > 0) {
    const size_t k = std::min(n, sizeof zeros);
    write(zeros, k);
    n -= k;
  }
}

void AtomicFile::write_at(uint64_t offset, const void* data, size_t n) {
  PL_CHECK(fd_ >= 0, internal, "AtomicFile::write_at after commit (", path_, ")");
  flush();
  const auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    const ssize_t w = ::pwrite(fd_, p, n, static_cast<off_t>(offset));
    if (w < 0 && errno == EINTR) continue;
    PL_CHECK(w > 0, io, "cannot write ", tmp_path_, " at byte ", offset, ": ",
             w < 0 ? std::strerror(errno) : "no progress");
    p += w;
    n -= static_cast<size_t>(w);
    offset += static_cast<uint64_t>(w);
  }
}

void AtomicFile::commit() {
  PL_CHECK(fd_ >= 0, internal, "AtomicFile::commit twice (", path_, ")");
  flush();
  PL_CHECK(::fsync(fd_) == 0, io, "cannot fsync ", tmp_path_, ": ", std::strerror(errno));
  const int rc = ::close(fd_);
  fd_ = -1;
  PL_CHECK(rc == 0, io, "cannot close ", tmp_path_, ": ", std::strerror(errno));
  PL_CHECK(std::rename(tmp_path_.c_str(), path_.c_str()) == 0, io, "cannot rename ", tmp_path_, " to ", path_, ": ",
           std::strerror(errno));
  committed_ = true;
  // Make the rename itself durable; a directory that cannot be opened for fsync is not an error.
  std::string dir = std::filesystem::path(path_).parent_path().string();
  if (dir.empty()) dir = ".";
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

std::string read_text_file(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  PL_CHECK(in.good(), io, "cannot read ", what, " '", path, "' (no such file, or not readable)");
  std::ostringstream os;
  os << in.rdbuf();
  PL_CHECK(!in.bad(), io, "error while reading ", what, " '", path, "'");
  return os.str();
}

}  // namespace peerless
