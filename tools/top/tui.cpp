// The terminal UI of shmps-top (ncurses), in the manner of htop: a header with the job's state,
// sparklines of the push rate and the apply throughput, the workers and parameters tables.
//
// Keys: q quit; Tab cycles the view (both, workers, params), w / p / b pick one; s (S) cycles the
// sort column of the workers (parameters) table, r (R) reverses it; h help. Ctrl-C and SIGTERM
// end it cleanly too (the terminal is restored). It keeps running when the server dies or the
// segment goes away, says so, and follows the new server (epoch) or segment when it comes back.
#include <langinfo.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstring>
#include <ctime>
#include <deque>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include <shmps/shm/names.hpp>

#include "format.hpp"
#include "metrics.hpp"
#include "modes.hpp"
#include "render.hpp"
#include "table.hpp"

#include <curses.h>  // last: it defines macros (timeout, erase, OK, ...)

namespace shmps::top {

namespace {

volatile std::sig_atomic_t g_stop = 0;
extern "C" void on_stop_signal(int) { g_stop = 1; }

using Clock = std::chrono::steady_clock;

enum class View { both, workers, params };

const char* view_name(View v) {
  switch (v) {
    case View::both: return "workers+params";
    case View::workers: return "workers";
    case View::params: return "params";
  }
  return "?";
}

enum Colour : short { kGood = 1, kWarn = 2, kBad = 3, kTitle = 4 };

// ncurses for as long as the object lives: endwin() however the UI ends (return, exception).
class Screen {
 public:
  Screen() {
    initscr();
    cbreak();  // Ctrl-C stays a signal (handled: a clean exit)
    noecho();
    keypad(stdscr, TRUE);
    curs_set(0);
    wtimeout(stdscr, 100);  // getch waits at most 100 ms: signals and samples are never late
    if (has_colors()) {
      start_color();
      use_default_colors();
      init_pair(kGood, COLOR_GREEN, -1);
      init_pair(kWarn, COLOR_YELLOW, -1);
      init_pair(kBad, COLOR_RED, -1);
      init_pair(kTitle, COLOR_CYAN, -1);
      colours_ = true;
    }
  }
  ~Screen() { endwin(); }
  Screen(const Screen&) = delete;
  Screen& operator=(const Screen&) = delete;

  attr_t colour(Colour c) const { return colours_ ? static_cast<attr_t>(COLOR_PAIR(c)) : A_BOLD; }

 private:
  bool colours_ = false;
};

// Drawing clipped to the screen: nothing is ever written outside it, whatever its size.
struct Painter {
  int rows = 0, cols = 0;

  void text(int y, int x, const std::string& s, attr_t attr = A_NORMAL) const {
    if (y < 0 || y >= rows || x < 0 || x >= cols || s.empty()) return;
    const int n = std::min(static_cast<int>(s.size()), cols - x);
    attr_on(attr, nullptr);
    mvaddnstr(y, x, s.c_str(), n);
    attr_off(attr, nullptr);
  }
  // A whole line, padded to the screen's width (for reverse-video bars).
  void bar(int y, const std::string& s, attr_t attr) const {
    std::string line = s;
    if (static_cast<int>(line.size()) < cols) line.append(static_cast<std::size_t>(cols) - line.size(), ' ');
    text(y, 0, line, attr);
  }
  // Glyphs of one column each (UTF-8 block characters or ASCII).
  void glyphs(int y, int x, const std::vector<const char*>& g, attr_t attr) const {
    if (y < 0 || y >= rows) return;
    attr_on(attr, nullptr);
    for (std::size_t i = 0; i < g.size() && x + static_cast<int>(i) < cols; ++i) mvaddstr(y, x + static_cast<int>(i), g[i]);
    attr_off(attr, nullptr);
  }
};

struct History {
  static constexpr std::size_t kLimit = 60;
  std::deque<double> values;
  void add(double v) {
    values.push_back(std::isfinite(v) ? v : 0.0);
    while (values.size() > kLimit) values.pop_front();
  }
};

class Ui {
 public:
  Ui(Source& source, std::chrono::milliseconds interval, bool utf8) : source_(source), interval_(interval), utf8_(utf8) {}

  int run() {
    Screen screen;
    screen_ = &screen;
    auto next_sample = Clock::now();
    bool dirty = true;
    while (!g_stop) {
      if (Clock::now() >= next_sample) {
        take_sample();
        next_sample = Clock::now() + interval_;
        dirty = true;
      }
      if (dirty) draw();
      dirty = false;
      const int ch = getch();
      if (ch == ERR) continue;
      dirty = true;
      if (help_) {  // any key closes the help; q still quits
        help_ = false;
        if (ch != 'q' && ch != 'Q') continue;
      }
      if (!on_key(ch)) break;
    }
    screen_ = nullptr;
    return 0;
  }

 private:
  // False to quit.
  bool on_key(int ch) {
    switch (ch) {
      case 'q':
      case 'Q':
      case 3:  // Ctrl-C, should the terminal deliver it as a key
        return false;
      case '\t': view_ = view_ == View::both ? View::workers : view_ == View::workers ? View::params : View::both; break;
      case KEY_BTAB: view_ = view_ == View::both ? View::params : view_ == View::params ? View::workers : View::both; break;
      case 'w': view_ = view_ == View::workers ? View::both : View::workers; break;
      case 'p': view_ = view_ == View::params ? View::both : View::params; break;
      case 'b': view_ = View::both; break;
      case 's':
        if (view_ == View::params) param_sort_ = (param_sort_ + 1) % param_columns().size();
        else worker_sort_ = (worker_sort_ + 1) % worker_columns().size();
        break;
      case 'S': param_sort_ = (param_sort_ + 1) % param_columns().size(); break;
      case 'r':
        if (view_ == View::params) param_desc_ = !param_desc_;
        else worker_desc_ = !worker_desc_;
        break;
      case 'R': param_desc_ = !param_desc_; break;
      case 'h':
      case '?': help_ = true; break;
      default: break;  // KEY_RESIZE and the rest: just draw again
    }
    return true;
  }

  void take_sample() {
    Sample s = source_.sample();
    Metrics m = compute_metrics(previous_ ? &*previous_ : nullptr, s);
    if (s.presence == Presence::ready && last_ready_) {
      const Sample& old = last_ready_->now;
      if (old.mapping_id != s.mapping_id) {
        pushes_ = {};
        applied_ = {};
        flash("a new segment '" + s.segment + "' (another job under the same name), epoch " + std::to_string(s.epoch));
      } else if (old.epoch != s.epoch) {
        flash("server restarted: new epoch " + std::to_string(s.epoch) + " (was " + std::to_string(old.epoch) + "), pid " +
              std::to_string(s.server_pid));
      }
    }
    if (m.pushes_per_s) pushes_.add(*m.pushes_per_s);
    if (m.floats_per_s) applied_.add(*m.floats_per_s);
    if (s.presence == Presence::ready) last_ready_ = m;
    previous_ = std::move(s);
    current_ = std::move(m);
  }

  void flash(std::string text) {
    flash_ = std::move(text);
    flash_until_ = Clock::now() + std::chrono::seconds(10);
  }

  // What is wrong right now, if anything, in one line (and how bad).
  std::optional<std::pair<std::string, Colour>> status() const {
    const Sample& s = current_.now;
    const std::string path = shm::segment_path(s.segment);
    switch (s.presence) {
      case Presence::missing:
        return std::pair{"SEGMENT GONE: no " + path + "; waiting for it to come back", kBad};
      case Presence::unreadable: return std::pair{"CANNOT USE THE SEGMENT: " + s.problem, kBad};
      case Presence::creating: return std::pair{s.problem + "; waiting", kWarn};
      case Presence::ready: break;
    }
    if (!s.server_alive && s.state == "stopped")
      return std::pair{"SERVER STOPPED (epoch " + std::to_string(s.epoch) + "): the job is over or paused; waiting for a new server",
                       kWarn};
    if (!s.server_alive)
      return std::pair{"SERVER GONE (pid " + std::to_string(s.server_pid) + ", epoch " + std::to_string(s.epoch) +
                           "): waiting for a new server; pushes wait in the rings",
                       kBad};
    if (s.state != "ready") return std::pair{"segment state: " + s.state, kWarn};
    return std::nullopt;
  }

  std::vector<const char*> spark(const History& h, std::size_t width) const {
    static const char* const kBlocks[] = {" ", "\u2581", "\u2582", "\u2583", "\u2584", "\u2585", "\u2586", "\u2587", "\u2588"};
    static const char* const kAscii[] = {" ", ".", ":", "-", "=", "+", "*", "#", "@"};
    const auto& levels = utf8_ ? kBlocks : kAscii;
    const std::size_t n = std::min(width, h.values.size());
    double top = 0;
    for (std::size_t i = h.values.size() - n; i < h.values.size(); ++i) top = std::max(top, h.values[i]);
    std::vector<const char*> out;
    for (std::size_t i = h.values.size() - n; i < h.values.size(); ++i) {
      const double v = h.values[i];
      int level = 0;
      if (v > 0 && top > 0) level = 1 + std::min(7, static_cast<int>(v / top * 7.999));
      out.push_back(levels[level]);
    }
    return out;
  }

  void draw_spark(const Painter& p, int y, const std::string& label, const History& h, const std::string& unit) const {
    const std::string now = h.values.empty() ? "-" : human_count(h.values.back());
    double top = 0;
    for (double v : h.values) top = std::max(top, v);
    const std::string right = " " + now + " " + unit + " (max " + human_count(top) + ")";
    p.text(y, 0, label, A_BOLD);
    const int width = std::max(0, std::min<int>(History::kLimit, p.cols - static_cast<int>(label.size() + right.size())));
    const auto g = spark(h, static_cast<std::size_t>(width));
    p.glyphs(y, static_cast<int>(label.size()), g, screen_->colour(kGood));
    p.text(y, static_cast<int>(label.size() + g.size()), right);
  }

  // A table in rows [y, end): title, header, lines; returns the next free row.
  int draw_table(const Painter& p, int y, int end, const std::string& title, const TextTable& t,
                 const std::vector<Colour>& line_colours, const std::string& empty) const {
    if (y >= end) return y;
    p.text(y++, 0, title, A_BOLD | screen_->colour(kTitle));
    if (y >= end) return y;
    p.bar(y++, t.header, A_REVERSE);
    if (t.lines.empty() && y < end) p.text(y++, 1, empty);
    for (std::size_t i = 0; i < t.lines.size() && y < end; ++i) {
      if (y == end - 1 && i + 1 < t.lines.size()) {
        p.text(y++, 0, "... " + std::to_string(t.lines.size() - i) + " more (enlarge the terminal)");
        break;
      }
      const attr_t attr = i < line_colours.size() && line_colours[i] != kGood ? screen_->colour(line_colours[i]) : A_NORMAL;
      p.text(y++, 0, t.lines[i], attr);
    }
    return y;
  }

  std::string sort_text(const std::string& column, bool desc) const { return "sort: " + column + (desc ? " desc" : " asc"); }

  void draw() {
    erase();
    Painter p{LINES, COLS};
    const Sample& s = current_.now;
    if (p.rows < 6 || p.cols < 24) {  // too small for anything useful: say so, and keep running
      p.text(0, 0, "shmps-top " + s.segment);
      p.text(1, 0, "terminal too small");
      p.text(2, 0, "q: quit");
      refresh();
      return;
    }
    char clock[16] = "";
    const std::time_t t = std::time(nullptr);
    std::tm tm{};
    localtime_r(&t, &tm);
    std::strftime(clock, sizeof clock, "%H:%M:%S", &tm);
    const std::string right = std::string(clock) + "  h: help ";
    std::string title = " shmps-top  " + printable(s.segment) + "   view: " + view_name(view_) + "   every " +
                        human_duration(std::chrono::duration<double>(interval_).count());
    if (static_cast<int>(title.size() + right.size()) < p.cols)
      title.append(static_cast<std::size_t>(p.cols) - title.size() - right.size(), ' ');
    p.bar(0, title + right, A_REVERSE | A_BOLD);

    int y = 1;
    if (const auto st = status()) p.text(y++, 0, st->first, A_BOLD | screen_->colour(st->second));
    if (!flash_.empty() && Clock::now() < flash_until_) p.text(y++, 0, flash_, A_BOLD | screen_->colour(kGood));
    for (const auto& line : summary_lines(current_)) p.text(y++, 0, printable(line));
    const int footer = p.rows - 1;
    if (y + 8 < footer) {
      draw_spark(p, y++, "push/s   ", pushes_, "pushes/s");
      draw_spark(p, y++, "applied  ", applied_, "floats/s");
    }
    ++y;

    // Tables: the current sample's, or the last one seen while the segment is away.
    const Metrics* shown = s.presence == Presence::ready ? &current_ : last_ready_ ? &*last_ready_ : nullptr;
    if (shown) {
      const std::string stale = shown != &current_ ? "   (as last seen)" : "";
      std::vector<WorkerMetrics> used;
      for (const auto& w : shown->workers)
        if (w.now.status != "free") used.push_back(w);
      sort_rows(used, worker_sort_, worker_desc_);
      const TextTable workers = layout(used);
      std::vector<Colour> colours;  // a dead worker's row in red, a suspect one's in yellow
      for (const auto& w : used) colours.push_back(w.now.status == "dead" ? kBad : (w.now.status == "suspect" || w.now.status == "evicted") ? kWarn : kGood);
      std::vector<ParamMetrics> param_rows = shown->params;
      sort_rows(param_rows, param_sort_, param_desc_);
      const TextTable params = layout(param_rows);
      const std::string wtitle = "WORKERS  " + std::to_string(used.size()) + " of " + std::to_string(shown->workers.size()) +
                                 " slots used   " + sort_text(worker_columns()[worker_sort_].title, worker_desc_) + stale;
      const std::string ptitle = "PARAMETERS  " + std::to_string(shown->params.size()) + "   " +
                                 sort_text(param_columns()[param_sort_].title, param_desc_) + stale;
      const std::string no_workers = "(no worker has attached yet)";
      if (view_ == View::workers) {
        draw_table(p, y, footer, wtitle, workers, colours, no_workers);
      } else if (view_ == View::params) {
        draw_table(p, y, footer, ptitle, params, {}, "(no parameters)");
      } else {
        const int room = footer - y;
        const int want_workers = static_cast<int>(std::max<std::size_t>(workers.lines.size(), 1)) + 2;
        const int want_params = static_cast<int>(std::max<std::size_t>(params.lines.size(), 1)) + 2;
        int for_workers = want_workers;
        if (want_workers + 1 + want_params > room) for_workers = std::max(std::min(want_workers, room / 2), std::min(3, room));
        y = draw_table(p, y, y + for_workers, wtitle, workers, colours, no_workers);
        draw_table(p, y + 1, footer, ptitle, params, {}, "(no parameters)");
      }
    }
    p.bar(footer, " q quit  Tab/w/p/b view  s/S sort  r/R reverse  h help", A_REVERSE);
    if (help_) draw_help(p);
    refresh();
  }

  void draw_help(const Painter& p) const {
    static const std::vector<std::string> lines{
        "shmps-top keys",
        "",
        "  q, Ctrl-C   quit",
        "  Tab         next view: workers+params, workers, params",
        "  w / p / b   workers only / params only / both",
        "  s           next sort column (workers; params in the params view)",
        "  S           next sort column of the params table",
        "  r / R       reverse the sort (workers / params)",
        "  h, ?        this help (any key closes it)",
        "",
        "Worker states: alive (holds its slot lock), suspect (no heartbeat",
        "for 5 s), dead (lock released), left (left the job), free.",
        "WAIT%: time in pulls waiting (barrier, staleness bound); BKPR%:",
        "pushes waiting for ring room; RING: bytes not yet applied.",
        "The monitor maps the segment read-only and takes no lock.",
    };
    int width = 0;
    for (const auto& l : lines) width = std::max(width, static_cast<int>(l.size()));
    width = std::min(width + 4, p.cols);
    const int height = std::min(static_cast<int>(lines.size()) + 2, p.rows);
    const int top = std::max(0, (p.rows - height) / 2), left = std::max(0, (p.cols - width) / 2);
    Painter box{std::min(p.rows, top + height), std::min(p.cols, left + width)};
    for (int i = 0; i < height; ++i) {
      const std::string text = i >= 1 && i - 1 < static_cast<int>(lines.size()) ? "  " + lines[static_cast<std::size_t>(i - 1)] : "";
      box.text(top + i, left, text + std::string(static_cast<std::size_t>(width), ' '), A_REVERSE);
    }
  }

  Source& source_;
  std::chrono::milliseconds interval_;
  bool utf8_;
  Screen* screen_ = nullptr;
  std::optional<Sample> previous_;
  Metrics current_;
  std::optional<Metrics> last_ready_;
  History pushes_, applied_;
  View view_ = View::both;
  std::size_t worker_sort_ = 0, param_sort_ = 0;
  bool worker_desc_ = false, param_desc_ = false;
  bool help_ = false;
  std::string flash_;
  Clock::time_point flash_until_{};
};

}  // namespace

int run_tui(Source& source, std::chrono::milliseconds interval) {
  if (!::isatty(STDIN_FILENO) || !::isatty(STDOUT_FILENO)) {
    std::cerr << "shmps-top: not a terminal; use --once, --json, --prometheus or --listen HOST:PORT\n";
    return 1;
  }
  // Our handlers before initscr(), which then leaves SIGINT and SIGTERM to us. No SA_RESTART:
  // getch() returns at once and the loop ends, restoring the terminal.
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) ::sigaction(sig, &sa, nullptr);
  const bool utf8 = std::strcmp(nl_langinfo(CODESET), "UTF-8") == 0;
  Ui ui(source, interval, utf8);
  return ui.run();
}

}  // namespace shmps::top
