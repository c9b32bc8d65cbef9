// A small gnuplot driver: every plot peerless draws (`peerless plot`, `peerless fit --out`) is a
// Plot of series (lines, points, or bands between two curves), written as a data file and a
// script into an output directory and rendered by `gnuplot` to PNG (the pngcairo terminal of
// Debian's gnuplot-nox, headless). Nothing is drawn in C++; the .gp and .dat files stay beside the
// PNG so a figure can be restyled by hand.
#pragma once

#include <string>
#include <vector>

namespace peerless {

enum class PlotStyle { lines, points, linespoints, steps, band };

struct PlotSeries {
  std::string title;  // legend entry; empty = not in the legend
  PlotStyle style = PlotStyle::lines;
  std::vector<double> x, y;
  std::vector<double> y_hi;  // band only: the area between y and y_hi
  int color = 0;             // gnuplot line type (1, 2, ...): a band and its line can share one; 0 = next
};

struct Plot {
  std::string title, xlabel, ylabel;  // labels carry units: "compute C (FLOPs)"
  bool log_x = false, log_y = false;
  std::string key = "top right";  // gnuplot `set key` position ("outside right", ...)
  std::vector<PlotSeries> series;
};

// Writes DIR/STEM.dat and DIR/STEM.gp, runs gnuplot and returns the path of DIR/STEM.png. Points
// that are not finite (or not positive on a log axis) are left out. Throws io when gnuplot is
// missing (naming the package) or fails (with its messages).
std::string render_plot(const Plot& plot, const std::string& dir, const std::string& stem);

// The gnuplot script for `plot` reading `data_path` and writing `png_path` (exposed for tests).
std::string gnuplot_script(const Plot& plot, const std::string& data_path, const std::string& png_path);

}  // namespace peerless
