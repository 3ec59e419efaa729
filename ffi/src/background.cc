#include "background.h"

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <utility>

namespace pigjax {
namespace {

class BackgroundQueue {
 public:
  BackgroundQueue() : thread_([this] { loop(); }) {}

  ~BackgroundQueue() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      hold_ = false;
    }
    cv_.notify_all();
    thread_.join();
  }

  void push(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      tasks_.push_back(std::move(task));
    }
    cv_.notify_all();
  }

  void hold(bool h) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      hold_ = h;
    }
    cv_.notify_all();
  }

 private:
  void loop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return (!hold_ && !tasks_.empty()) || (stop_ && tasks_.empty()); });
      if (tasks_.empty()) return;  // stopping, drained
      std::function<void()> task = std::move(tasks_.front());
      tasks_.pop_front();
      lock.unlock();
      task();
      task = nullptr;  // its captures (a freed store's last reference) go before the lock is retaken
      lock.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  bool stop_ = false;
  bool hold_ = false;
  std::thread thread_;  // last: starts after the members it uses
};

// Destroyed at exit after draining: a queued build finishes before the process does (the worker
// pool it uses is never destroyed).
BackgroundQueue& queue() {
  static BackgroundQueue q;
  return q;
}

}  // namespace

void run_in_background(std::function<void()> task) { queue().push(std::move(task)); }

void hold_background(bool hold) { queue().hold(hold); }

}  // namespace pigjax
