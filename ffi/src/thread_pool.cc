// See thread_pool.h.
#include "thread_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace pigjax {

int default_num_threads() {
  const char* env = std::getenv("PIGJAX_NUM_THREADS");
  if (env != nullptr && env[0] != '\0') {
    char* end = nullptr;
    long v = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && v > 0 && v <= 4096) return static_cast<int>(v);
    std::fprintf(stderr, "pigjax: ignoring PIGJAX_NUM_THREADS=%s (expected a positive integer)\n",
                 env);
  }
  unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : static_cast<int>(hc);
}

// Thread pool: persistent workers + participating caller. Several callers (XLA threads) may
// run parallel_for at once; each caller drains its own job, so a job always finishes even if
// no worker is free (or while the pool is being resized).

namespace {

class ThreadPool {
 public:
  ThreadPool() { resize(default_num_threads()); }
  ~ThreadPool() { stop_workers(); }

  int size() const { return size_.load(); }

  void resize(int n) {
    if (n < 1) n = 1;
    std::lock_guard<std::mutex> resize_lock(resize_mu_);
    stop_workers();
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = false;
    }
    workers_.reserve(n - 1);
    for (int i = 0; i + 1 < n; ++i) workers_.emplace_back([this] { worker_loop(); });
    size_.store(n);
  }

  void run(int64_t n, const std::function<void(int64_t)>& fn) {
    if (n <= 0) return;
    if (n == 1 || size_.load() <= 1) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    Job job;
    job.fn = &fn;
    job.n = n;
    {
      std::lock_guard<std::mutex> lock(mu_);
      jobs_.push_back(&job);
    }
    cv_work_.notify_all();
    for (;;) {
      const int64_t i = job.next.fetch_add(1);
      if (i >= n) break;
      execute(&job, i);
    }
    std::unique_lock<std::mutex> lock(mu_);
    cv_done_.wait(lock, [&] { return job.done == job.n; });
    auto it = std::find(jobs_.begin(), jobs_.end(), &job);
    if (it != jobs_.end()) jobs_.erase(it);
    lock.unlock();
    if (job.error) std::rethrow_exception(job.error);
  }

 private:
  struct Job {
    const std::function<void(int64_t)>* fn = nullptr;
    int64_t n = 0;
    std::atomic<int64_t> next{0};
    int64_t done = 0;  // guarded by mu_
    std::exception_ptr error;  // guarded by mu_
  };

  void execute(Job* job, int64_t i) {
    std::exception_ptr err;
    try {
      (*job->fn)(i);
    } catch (...) {
      err = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (err && !job->error) job->error = err;
    if (++job->done == job->n) cv_done_.notify_all();
  }

  void worker_loop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_work_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
      if (stop_) return;
      Job* job = jobs_.front();
      const int64_t i = job->next.fetch_add(1);
      if (i >= job->n) {
        jobs_.pop_front();  // exhausted; its caller waits for the running indices
        continue;
      }
      lock.unlock();
      execute(job, i);
      lock.lock();
    }
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_work_.notify_all();
    for (std::thread& t : workers_) t.join();
    workers_.clear();
  }

  std::mutex resize_mu_;
  std::mutex mu_;
  std::condition_variable cv_work_, cv_done_;
  std::deque<Job*> jobs_;
  std::vector<std::thread> workers_;
  bool stop_ = false;
  std::atomic<int> size_{1};
};

ThreadPool& pool() {
  static ThreadPool* p = new ThreadPool();  // leaked on purpose: no join at static destruction
  return *p;
}

}  // namespace

void set_num_threads(int n) { pool().resize(n); }
int get_num_threads() { return pool().size(); }
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) { pool().run(n, fn); }

}  // namespace pigjax
