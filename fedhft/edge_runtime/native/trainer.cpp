// fedhft-et-trainer: trains an ExecuTorch joint forward+backward program (train.pte + adapter.ptd) with
// AdamW, torch-free, on the ExecuTorch C++ runtime the executorch wheel ships (extension Module API).
//
// Usage: fedhft-et-trainer PROGRAM.pte WEIGHTS.ptd
// It speaks the binary frames of frames.h on stdin/stdout; logs go to stderr. The program's method
// "forward" returns [loss, logits, gradients..., parameters...]; the config methods
// __et_training_{gradients,parameters}_index_forward and __et_training_fqn_forward say where each part
// starts and name the parameters. Parameter outputs alias the program's writable adapter memory: updating
// them in place is how a step (or a new global model) gets into the program.
#include <executorch/devtools/etdump/etdump_flatcc.h>
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/runtime.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <exception>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "adamw.h"
#include "frames.h"

// The wheel ships libexecutorch_threadpool.so but not its threadpool.h; these two declarations match the
// exported symbols (ThreadPool::_unsafe_reset_threadpool(unsigned int), get_threadpool()).
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::extension::from_blob;
using executorch::extension::module::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using fedhft::Reader;
using fedhft::Writer;

const char* kMethod = "forward";

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out;
}

// An event tracer that records nothing. Measured with executorch 1.5.1 (MiniLM, int8 base, batch 8, seq 128,
// XNNPACK delegates, one thread): with any event tracer attached to the Module a training step costs about
// 0.55 s of CPU, without one 0.9-1.3 s, for the same losses (the Python bindings show the same with
// enable_etdump). We have not found the cause inside the runtime; this no-op tracer keeps the fast path.
class NullTracer final : public executorch::runtime::EventTracer {
 public:
  using Entry = executorch::runtime::EventTracerEntry;
  using DId = executorch::runtime::DelegateDebugIntId;
  void create_event_block(const char*) override {}
  Entry start_profiling(const char*, executorch::runtime::ChainID, executorch::runtime::DebugHandle) override {
    return Entry{};
  }
  Entry start_profiling_delegate(const char*, DId) override { return Entry{}; }
  void end_profiling_delegate(Entry, const void*, size_t) override {}
  void log_profiling_delegate(const char*, DId, et_timestamp_t, et_timestamp_t, const void*, size_t) override {}
  void end_profiling(Entry) override {}
  void track_allocation(executorch::runtime::AllocatorID, size_t) override {}
  executorch::runtime::AllocatorID track_allocator(const char*) override { return 0; }
  executorch::runtime::Result<bool> log_evalue(const EValue&, executorch::runtime::LoggedEValueType) override {
    return false;
  }
  executorch::runtime::Result<bool> log_intermediate_output_delegate(const char*, DId, const Tensor&) override {
    return false;
  }
  executorch::runtime::Result<bool> log_intermediate_output_delegate(
      const char*, DId, const executorch::runtime::ArrayRef<Tensor>) override {
    return false;
  }
  executorch::runtime::Result<bool> log_intermediate_output_delegate(const char*, DId, const int&) override {
    return false;
  }
  executorch::runtime::Result<bool> log_intermediate_output_delegate(const char*, DId, const bool&) override {
    return false;
  }
  executorch::runtime::Result<bool> log_intermediate_output_delegate(const char*, DId, const double&) override {
    return false;
  }
  void set_delegation_intermediate_output_filter(executorch::runtime::EventTracerFilterBase*) override {}
};

struct Param {
  std::string name;
  std::vector<int64_t> shape;
  size_t numel = 0;
  float* data = nullptr;  // aliases the program's memory (valid after the first run)
  std::vector<float> m, v;
};

class Trainer {
 public:
  // With a non-empty `etdump_path`, every kernel call is timed and the ETDump is written there on exit
  // (read it with executorch.devtools.Inspector).
  Trainer(const std::string& pte, const std::string& ptd, const std::string& etdump_path)
      : etdump_path_(etdump_path),
        etdump_(etdump_path.empty() ? nullptr : new executorch::etdump::ETDumpGen()),
        module_(pte, ptd, Module::LoadMode::Mmap,
                etdump_ ? std::unique_ptr<executorch::runtime::EventTracer>(etdump_)
                        : std::unique_ptr<executorch::runtime::EventTracer>(new NullTracer())) {
    check(module_.load(executorch::runtime::Program::Verification::InternalConsistency), "load the program");
    check(module_.load_method(kMethod), "load method 'forward'");
    grad_start_ = config_int(std::string("__et_training_gradients_index_") + kMethod);
    param_start_ = config_int(std::string("__et_training_parameters_index_") + kMethod);
    auto names = module_.execute(std::string("__et_training_fqn_") + kMethod);
    check(names.error(), "read the parameter names");
    auto meta = module_.method_meta(kMethod);
    check(meta.error(), "read the method's metadata");
    if (param_start_ <= grad_start_ || grad_start_ < 1) throw std::runtime_error("bad training metadata indices");
    const size_t n = names->size();
    if (param_start_ - grad_start_ != n || meta->num_outputs() != param_start_ + n) {
      throw std::runtime_error("the program's outputs do not match its training metadata");
    }
    for (size_t i = 0; i < n; ++i) {
      Param p;
      p.name = std::string((*names)[i].toString());
      auto info = meta->output_tensor_meta(param_start_ + i);
      check(info.error(), "read a parameter's metadata");
      if (info->scalar_type() != ScalarType::Float) throw std::runtime_error("parameter " + p.name + " is not float32");
      p.numel = 1;
      for (auto s : info->sizes()) {
        p.shape.push_back(s);
        p.numel *= static_cast<size_t>(s);
      }
      p.m.assign(p.numel, 0.0f);
      p.v.assign(p.numel, 0.0f);
      params_.push_back(std::move(p));
    }
    for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
      auto size = meta->memory_planned_buffer_size(i);
      check(size.error(), "read the memory plan");
      planned_bytes_ += static_cast<size_t>(*size);
    }
    auto in0 = meta->input_tensor_meta(0);
    check(in0.error(), "read the input metadata");
    max_batch_ = in0->sizes()[0];
    max_seq_ = in0->sizes()[1];
  }

  // Runs the joint method; fills loss/logits; with `update`, applies AdamW to every parameter.
  void step(Reader& r, Writer& w, bool update) {
    const int64_t b = r.get<int64_t>();
    const int64_t s = r.get<int64_t>();
    if (b < 1 || s < 1 || b > max_batch_ || s > max_seq_) {
      throw std::runtime_error("input shape " + std::to_string(b) + "x" + std::to_string(s) +
                               " is outside the program's bounds " + std::to_string(max_batch_) + "x" +
                               std::to_string(max_seq_));
    }
    std::vector<int64_t> ids(static_cast<size_t>(b * s)), mask(static_cast<size_t>(b * s)), labels(b);
    r.take(ids.data(), ids.size() * 8);
    r.take(mask.data(), mask.size() * 8);
    r.take(labels.data(), labels.size() * 8);
    if (!r.done()) throw std::runtime_error("trailing bytes in a step request");
    auto t_ids = from_blob(ids.data(), {static_cast<int>(b), static_cast<int>(s)}, ScalarType::Long);
    auto t_mask = from_blob(mask.data(), {static_cast<int>(b), static_cast<int>(s)}, ScalarType::Long);
    auto t_y = from_blob(labels.data(), {static_cast<int>(b)}, ScalarType::Long);
    auto out = module_.execute(kMethod, {EValue(*t_ids), EValue(*t_mask), EValue(*t_y)});
    check(out.error(), "run the training step");
    const Tensor loss = (*out)[0].toTensor();
    const Tensor logits = (*out)[1].toTensor();
    if (!bound_) bind(*out);
    if (update) {
      ++step_;
      for (size_t i = 0; i < params_.size(); ++i) {
        Param& p = params_[i];
        const Tensor g = (*out)[grad_start_ + i].toTensor();
        if (static_cast<size_t>(g.numel()) != p.numel) throw std::runtime_error("gradient size mismatch for " + p.name);
        fedhft::adamw_update(p.data, g.const_data_ptr<float>(), p.m.data(), p.v.data(), p.numel, lr_, step_, cfg_);
      }
    }
    w.put<float>(loss.const_data_ptr<float>()[0]);
    const int64_t cols = logits.dim() == 2 ? logits.size(1) : 1;
    w.put<int64_t>(cols);
    w.append(logits.const_data_ptr<float>(), sizeof(float) * static_cast<size_t>(b * cols));
  }

  void hello(Reader& r, Writer& w) {
    Writer ignored;
    step(r, ignored, false);  // the parameter outputs only exist after one run
    std::ostringstream js;
    js << "{\"protocol\":1,\"method\":\"" << kMethod << "\",\"max_batch\":" << max_batch_
       << ",\"max_seq\":" << max_seq_ << ",\"planned_bytes\":" << planned_bytes_ << ",\"parameters\":[";
    for (size_t i = 0; i < params_.size(); ++i) {
      js << (i ? "," : "") << "{\"name\":\"" << json_escape(params_[i].name) << "\",\"shape\":[";
      for (size_t k = 0; k < params_[i].shape.size(); ++k) js << (k ? "," : "") << params_[i].shape[k];
      js << "]}";
    }
    js << "]}";
    const std::string s = js.str();
    w.append(s.data(), s.size());
  }

  void get_params(Writer& w) {
    require_bound();
    for (auto& p : params_) w.append(p.data, p.numel * sizeof(float));
  }

  void set_params(Reader& r) {
    require_bound();
    const uint32_t count = r.get<uint32_t>();
    std::vector<std::pair<uint32_t, const uint8_t*>> todo;
    for (uint32_t k = 0; k < count; ++k) {  // validate everything before writing anything
      const uint32_t idx = r.get<uint32_t>();
      const uint64_t n = r.get<uint64_t>();
      if (idx >= params_.size() || n != params_[idx].numel) throw std::runtime_error("bad parameter index or size");
      todo.emplace_back(idx, r.take_bytes(n * sizeof(float)));
    }
    if (!r.done()) throw std::runtime_error("trailing bytes in set_params");
    for (auto& [idx, src] : todo) std::memcpy(params_[idx].data, src, params_[idx].numel * sizeof(float));
  }

  void get_state(Writer& w) {
    w.put<int64_t>(step_);
    for (auto& p : params_) w.append(p.m.data(), p.numel * sizeof(float));
    for (auto& p : params_) w.append(p.v.data(), p.numel * sizeof(float));
  }

  void set_state(Reader& r) {
    const int64_t step = r.get<int64_t>();
    if (step < 0) throw std::runtime_error("negative optimizer step");
    size_t total = 0;
    for (auto& p : params_) total += p.numel;
    const uint8_t* src = r.take_bytes(2 * total * sizeof(float));
    if (!r.done()) throw std::runtime_error("trailing bytes in set_state");
    for (auto& p : params_) {
      std::memcpy(p.m.data(), src, p.numel * sizeof(float));
      src += p.numel * sizeof(float);
    }
    for (auto& p : params_) {
      std::memcpy(p.v.data(), src, p.numel * sizeof(float));
      src += p.numel * sizeof(float);
    }
    step_ = step;
  }

  ~Trainer() {
    if (etdump_ == nullptr) return;
    executorch::etdump::ETDumpResult res = etdump_->get_etdump_data();
    if (res.buf == nullptr) return;
    if (FILE* f = std::fopen(etdump_path_.c_str(), "wb")) {
      std::fwrite(res.buf, 1, res.size, f);
      std::fclose(f);
    }
    std::free(res.buf);
  }

  void set_lr(Reader& r) {
    const double lr = r.get<double>();
    if (!(lr >= 0.0)) throw std::runtime_error("learning rate must be >= 0");
    lr_ = static_cast<float>(lr);
  }

 private:
  static void check(Error e, const char* what) {
    if (e != Error::Ok) {
      std::ostringstream os;
      os << "ExecuTorch cannot " << what << " (error 0x" << std::hex << static_cast<int>(e) << ")";
      throw std::runtime_error(os.str());
    }
  }
  size_t config_int(const std::string& method) {
    auto r = module_.execute(method);
    check(r.error(), "run a training metadata method");
    if (r->empty() || !(*r)[0].isInt()) throw std::runtime_error(method + " did not return an int");
    return static_cast<size_t>((*r)[0].toInt());
  }
  void bind(const std::vector<EValue>& out) {
    for (size_t i = 0; i < params_.size(); ++i) {
      Tensor t = out[param_start_ + i].toTensor();
      if (static_cast<size_t>(t.numel()) != params_[i].numel) throw std::runtime_error("parameter size mismatch");
      params_[i].data = t.mutable_data_ptr<float>();
    }
    bound_ = true;
  }
  void require_bound() const {
    if (!bound_) throw std::runtime_error("send hello first: parameters are bound after one run");
  }

  std::string etdump_path_;
  executorch::etdump::ETDumpGen* etdump_;  // owned by module_ (null: module_ owns a NullTracer)
  Module module_;
  std::vector<Param> params_;
  size_t grad_start_ = 0, param_start_ = 0;
  int64_t max_batch_ = 0, max_seq_ = 0;
  size_t planned_bytes_ = 0;  // the method's memory-planned arenas (activations, gradients, adapter)
  bool bound_ = false;
  int64_t step_ = 0;
  float lr_ = 1e-3f;
  fedhft::AdamWConfig cfg_;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s PROGRAM.pte WEIGHTS.ptd  (speaks fedhft frames on stdin/stdout)\n", argv[0]);
    return 2;
  }
  // The protocol owns the original stdout; anything else printing to fd 1 lands on stderr instead.
  const int out_fd = ::dup(1);
  ::dup2(2, 1);
  const int in_fd = 0;
  executorch::runtime::runtime_init();
  // FEDHFT_NATIVE_THREADS=N: kernels and XNNPACK use N threads (default: one per core).
  if (const char* threads = std::getenv("FEDHFT_NATIVE_THREADS")) {
    const long n = std::strtol(threads, nullptr, 10);
    auto* pool = executorch::extension::threadpool::get_threadpool();
    if (n > 0 && pool != nullptr) pool->_unsafe_reset_threadpool(static_cast<uint32_t>(n));
  }
  std::unique_ptr<Trainer> trainer;
  std::string load_error;
  try {
    const char* etdump = std::getenv("FEDHFT_ETDUMP");
    trainer = std::make_unique<Trainer>(argv[1], argv[2], etdump ? etdump : "");

  } catch (const std::exception& e) {
    load_error = e.what();
  }
  uint32_t op = 0;
  std::vector<uint8_t> payload;
  try {
    while (fedhft::read_request(in_fd, &op, &payload)) {
      if (op == fedhft::kQuit) {
        trainer.reset();  // flushes the ETDump, if one is being recorded
        fedhft::write_response(out_fd, 0, nullptr, 0);
        return 0;
      }
      fedhft::Writer w;
      try {
        if (!trainer) throw std::runtime_error(load_error);
        fedhft::Reader r(payload.data(), payload.size());
        switch (op) {
          case fedhft::kHello: trainer->hello(r, w); break;
          case fedhft::kTrain: trainer->step(r, w, true); break;
          case fedhft::kEval: trainer->step(r, w, false); break;
          case fedhft::kGetParams: trainer->get_params(w); break;
          case fedhft::kSetParams: trainer->set_params(r); break;
          case fedhft::kSetLr: trainer->set_lr(r); break;
          case fedhft::kGetState: trainer->get_state(w); break;
          case fedhft::kSetState: trainer->set_state(r); break;
          default: throw std::runtime_error("unknown op " + std::to_string(op));
        }
      } catch (const std::exception& e) {
        const std::string msg = e.what();
        fedhft::write_response(out_fd, 1, msg.data(), msg.size());
        continue;
      }
      fedhft::write_response(out_fd, 0, w.bytes().data(), w.bytes().size());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fedhft-et-trainer: %s\n", e.what());
    return 1;
  }
  return 0;
}
