// The gnuplot driver (see plot.h).
#include "launch/plot.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "runtime/error.h"

extern char** environ;

namespace peerless {
namespace {

namespace fs = std::filesystem;

// A gnuplot single-quoted string: only the quote itself needs escaping (as '').
std::string quoted(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("''") : std::string(1, c);
  return out + "'";
}

bool keep(const Plot& p, double x, double y) {
  return std::isfinite(x) && std::isfinite(y) && (!p.log_x || x > 0) && (!p.log_y || y > 0);
}

// One gnuplot data block per series (`index i`), separated by two blank lines.
std::string data_blocks(const Plot& p) {
  std::ostringstream out;
  out.precision(10);
  for (size_t i = 0; i < p.series.size(); ++i) {
    const PlotSeries& s = p.series[i];
    out << "# series " << i << ": " << s.title << "\n";
    for (size_t k = 0; k < s.x.size(); ++k) {
      const bool band = s.style == PlotStyle::band;
      if (!keep(p, s.x[k], s.y[k]) || (band && !keep(p, s.x[k], s.y_hi[k]))) continue;
      out << s.x[k] << ' ' << s.y[k];
      if (band) out << ' ' << s.y_hi[k];
      out << '\n';
    }
    // The "# series" line keeps an empty block a block, so `index i` still counts right.
    out << (i + 1 < p.series.size() ? "\n\n" : "\n");
  }
  return out.str();
}

std::string style_clause(const PlotSeries& s, int line_type) {
  const std::string lt = " lt " + std::to_string(line_type);
  switch (s.style) {
    case PlotStyle::lines:
      return "using 1:2 with lines lw 2" + lt;
    case PlotStyle::points:
      return "using 1:2 with points pt 7 ps 1.2" + lt;
    case PlotStyle::linespoints:
      return "using 1:2 with linespoints lw 2 pt 7" + lt;
    case PlotStyle::steps:
      return "using 1:2 with steps lw 2 dt 2" + lt;
    case PlotStyle::band:
      return "using 1:2:3 with filledcurves fs transparent solid 0.2 noborder" + lt;
  }
  return "";
}

bool series_empty(const Plot& p, const PlotSeries& s) {
  for (size_t k = 0; k < s.x.size(); ++k)
    if (keep(p, s.x[k], s.y[k])) return false;
  return true;
}

void run_gnuplot(const std::string& script, const std::string& log) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  char* argv[] = {const_cast<char*>("gnuplot"), const_cast<char*>(script.c_str()), nullptr};
  pid_t pid = 0;
  const int rc = posix_spawnp(&pid, "gnuplot", &actions, nullptr, argv, environ);
  posix_spawn_file_actions_destroy(&actions);
  PL_CHECK(rc != ENOENT, io,
           "gnuplot is not installed (or not on PATH): plots need it (Debian: apt-get install gnuplot-nox)");
  PL_CHECK(rc == 0, io, "cannot start gnuplot: ", std::strerror(rc));
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return;
  std::ifstream in(log);
  std::stringstream msg;
  msg << in.rdbuf();
  PL_CHECK(!(WIFEXITED(status) && WEXITSTATUS(status) == 127), io,
           "gnuplot could not be run (Debian: apt-get install gnuplot-nox)");
  PL_FAIL(io, "gnuplot failed on ", script, ":\n", msg.str());
}

}  // namespace

std::string gnuplot_script(const Plot& p, const std::string& data_path, const std::string& png_path) {
  std::ostringstream g;
  g << "# Written by peerless (launch/plot.cpp); run `gnuplot " << fs::path(png_path).stem().string()
    << ".gp` to redraw.\n"
    << "set terminal pngcairo size 1100,750 noenhanced font 'Sans,12'\n"
    << "set output " << quoted(png_path) << "\n"
    << "set title " << quoted(p.title) << "\n"
    << "set xlabel " << quoted(p.xlabel) << "\nset ylabel " << quoted(p.ylabel) << "\n"
    << "set grid\nset key " << p.key << " box opaque\n";
  if (p.log_x) g << "set logscale x\nset format x '%.0e'\n";
  if (p.log_y) g << "set logscale y\nset format y '%.0e'\n";
  g << "plot ";
  int next_color = 1, drawn = 0;
  for (size_t i = 0; i < p.series.size(); ++i) {
    const PlotSeries& s = p.series[i];
    const int color = s.color > 0 ? s.color : next_color++;
    if (series_empty(p, s)) continue;
    g << (drawn++ ? ", \\\n     " : "") << quoted(data_path) << " index " << i << ' ' << style_clause(s, color)
      << (s.title.empty() ? " notitle" : " title " + quoted(s.title));
  }
  PL_CHECK(drawn > 0, data, "nothing to plot for '", p.title, "': every series is empty");
  g << "\n";
  return g.str();
}

std::string render_plot(const Plot& plot, const std::string& dir, const std::string& stem) {
  fs::create_directories(dir);
  const std::string base = (fs::path(dir) / stem).string();
  const std::string script = gnuplot_script(plot, base + ".dat", base + ".png");
  for (const auto& [path, text] : {std::pair{base + ".dat", data_blocks(plot)}, std::pair{base + ".gp", script}}) {
    std::ofstream out(path, std::ios::trunc);
    out << text;
    PL_CHECK(out.good(), io, "cannot write ", path);
  }
  run_gnuplot(base + ".gp", base + ".log");
  std::error_code ec;
  PL_CHECK(fs::file_size(base + ".png", ec) > 0 && !ec, io, "gnuplot wrote no ", base, ".png (see ", base, ".log)");
  fs::remove(base + ".log", ec);
  return base + ".png";
}

}  // namespace peerless
