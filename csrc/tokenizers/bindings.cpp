// Python module fastllm.tokenizers._core: the fast encode/train core behind fastllm.tokenizers.
//
// Invariants:
// - The only file that sees Python. Texts are read in place as UTF-8 (PyUnicode_AsUTF8AndSize, no copy); a str
//   that is not valid Unicode (lone surrogates) raises UnicodeEncodeError. Anything but str raises TypeError.
// - Encoding runs without the GIL; batches use up to num_threads threads and give the same results as one.
// - Results: ids as list[int]; with offsets, (ids, list[tuple[int, int]]) with character offsets;
//   encode_batch_full: the six fields of a fastllm Encoding, framed by a template of special tokens.
#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "encoders.h"

namespace py = pybind11;
using namespace fastllm_tok;

namespace {

using Vocab = std::vector<std::pair<std::string, int32_t>>;

// Distinct C++ types for the two Python classes built on BasicEncoder (pybind11 registers a type once).
struct WordPieceEncoder : BasicEncoder {
  using BasicEncoder::BasicEncoder;
};
struct CharBPEEncoder : BasicEncoder {
  using BasicEncoder::BasicEncoder;
};
using MergeList = std::vector<std::array<int32_t, 3>>;

std::string_view utf8_of(py::handle obj) {
  if (!PyUnicode_Check(obj.ptr()))
    throw py::type_error(std::string("expected str, got ") + Py_TYPE(obj.ptr())->tp_name);
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(obj.ptr(), &size);
  if (!data) throw py::error_already_set();
  return std::string_view(data, static_cast<size_t>(size));
}

py::list int_list(const std::vector<int32_t>& v) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(v.size()));
  if (!list) throw py::error_already_set();
  for (size_t i = 0; i < v.size(); ++i) PyList_SET_ITEM(list, i, PyLong_FromLong(v[i]));
  return py::reinterpret_steal<py::list>(list);
}

py::list span_list(const std::vector<int32_t>& flat) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(flat.size() / 2));
  if (!list) throw py::error_already_set();
  for (size_t i = 0; i + 1 < flat.size(); i += 2) {
    PyObject* t = PyTuple_New(2);
    PyTuple_SET_ITEM(t, 0, PyLong_FromLong(flat[i]));
    PyTuple_SET_ITEM(t, 1, PyLong_FromLong(flat[i + 1]));
    PyObject_GC_UnTrack(t);  // a pair of ints can never be part of a cycle (CPython untracks it lazily too)
    PyList_SET_ITEM(list, i / 2, t);
  }
  return py::reinterpret_steal<py::list>(list);
}

py::object result(const Encoded& e, bool with_offsets) {
  if (!with_offsets) return int_list(e.ids);
  return py::make_tuple(int_list(e.ids), span_list(e.offsets));
}

py::object encode_one(const Encoder& enc, py::handle text, bool with_offsets) {
  const std::string_view s = utf8_of(text);
  Encoded out;
  {
    py::gil_scoped_release nogil;
    auto cache = enc.caches().acquire();
    enc.encode(s.data(), s.size(), with_offsets, *cache, out);
    enc.caches().release(std::move(cache));
  }
  return result(out, with_offsets);
}

py::list encode_batch(const Encoder& enc, const py::sequence& texts, bool with_offsets, int num_threads) {
  std::vector<std::string_view> views;
  views.reserve(py::len(texts));
  for (py::handle t : texts) views.push_back(utf8_of(t));
  std::vector<Encoded> outs;
  {
    py::gil_scoped_release nogil;
    outs = encode_many(enc, views, with_offsets, num_threads);
  }
  py::list res(outs.size());
  for (size_t i = 0; i < outs.size(); ++i) res[i] = result(outs[i], with_offsets);
  return res;
}

py::list new_list(size_t n) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(n));
  if (!list) throw py::error_already_set();
  return py::reinterpret_steal<py::list>(list);
}

inline void set_int(py::list& list, size_t i, long v) { PyList_SET_ITEM(list.ptr(), i, PyLong_FromLong(v)); }

// Every field of a fastllm Encoding for one sequence framed by a template: (id or -1 for the sequence, type id).
py::tuple encoding_fields(const Encoded& e, const std::vector<std::pair<int32_t, int32_t>>& tmpl, PyObject* itos) {
  size_t total = 0;
  for (const auto& [id, type_id] : tmpl) total += id < 0 ? e.ids.size() : 1;
  py::list ids = new_list(total), tokens = new_list(total), offsets = new_list(total);
  py::list types = new_list(total), attention = new_list(total), special = new_list(total);
  const Py_ssize_t n_tokens = PyList_GET_SIZE(itos);
  size_t k = 0;
  auto put = [&](int32_t id, int32_t type_id, int32_t start, int32_t end, int is_special) {
    if (id < 0 || id >= n_tokens) throw py::index_error("token id " + std::to_string(id) + " outside the vocabulary");
    set_int(ids, k, id);
    PyObject* token = PyList_GET_ITEM(itos, id);
    Py_INCREF(token);
    PyList_SET_ITEM(tokens.ptr(), k, token);
    PyObject* span = PyTuple_New(2);
    PyTuple_SET_ITEM(span, 0, PyLong_FromLong(start));
    PyTuple_SET_ITEM(span, 1, PyLong_FromLong(end));
    PyObject_GC_UnTrack(span);
    PyList_SET_ITEM(offsets.ptr(), k, span);
    set_int(types, k, type_id);
    set_int(attention, k, 1);
    set_int(special, k, is_special);
    ++k;
  };
  for (const auto& [id, type_id] : tmpl) {
    if (id >= 0) {
      put(id, type_id, 0, 0, 1);
      continue;
    }
    for (size_t i = 0; i < e.ids.size(); ++i) put(e.ids[i], type_id, e.offsets[2 * i], e.offsets[2 * i + 1], 0);
  }
  return py::make_tuple(ids, tokens, offsets, types, attention, special);
}

py::list encode_batch_full(const Encoder& enc, const py::sequence& texts,
                           const std::vector<std::pair<int32_t, int32_t>>& tmpl, const py::list& itos,
                           int num_threads) {
  std::vector<std::string_view> views;
  views.reserve(py::len(texts));
  for (py::handle t : texts) views.push_back(utf8_of(t));
  std::vector<Encoded> outs;
  {
    py::gil_scoped_release nogil;
    outs = encode_many(enc, views, true, num_threads);
  }
  py::list res(outs.size());
  for (size_t i = 0; i < outs.size(); ++i) res[i] = encoding_fields(outs[i], tmpl, itos.ptr());
  return res;
}

NormalizerOptions options(bool clean_text, bool handle_chinese_chars, bool strip_accents, bool lowercase) {
  NormalizerOptions o;
  o.clean_text = clean_text;
  o.handle_chinese_chars = handle_chinese_chars;
  o.strip_accents = strip_accents;
  o.lowercase = lowercase;
  return o;
}

py::list spans_to_list(const std::vector<Span>& spans) {
  py::list out(spans.size());
  for (size_t i = 0; i < spans.size(); ++i) out[i] = py::make_tuple(spans[i].first, spans[i].second);
  return out;
}

std::string utf8_from_cps(const std::vector<uint32_t>& cps) {
  std::string s;
  for (uint32_t c : cps) append_utf8(s, c);
  return s;
}

template <class T>
void bind_encoder_methods(py::class_<T, Encoder>& cls) {
  cls.def("encode", [](const T& self, py::handle text, bool with_offsets) {
        return encode_one(self, text, with_offsets);
      }, py::arg("text"), py::arg("with_offsets") = false)
      .def("encode_batch", [](const T& self, const py::sequence& texts, bool with_offsets, int num_threads) {
        return encode_batch(self, texts, with_offsets, num_threads);
      }, py::arg("texts"), py::arg("with_offsets") = false, py::arg("num_threads") = 1)
      .def("encode_batch_full", [](const T& self, const py::sequence& texts,
                                   const std::vector<std::pair<int32_t, int32_t>>& tmpl, const py::list& itos,
                                   int num_threads) { return encode_batch_full(self, texts, tmpl, itos, num_threads); },
           py::arg("texts"), py::arg("template"), py::arg("itos"), py::arg("num_threads") = 1,
           "Every Encoding field (ids, tokens, offsets, type_ids, attention_mask, special_tokens_mask) per text; "
           "template: (token id, type id) pairs, id -1 standing for the text");
}

#define NORMALIZER_ARGS                                                                        \
  py::arg("clean_text") = true, py::arg("handle_chinese_chars") = true, py::arg("strip_accents") = true, \
      py::arg("lowercase") = true

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastllm tokenizers core: GPT-2 byte-level BPE, WordPiece, classic BPE encoders and the BPE trainer";
  m.attr("UNICODE_VERSION") = tables::kUnicodeVersion;

  m.def("char_flags", [](uint32_t cp) { return static_cast<int>(flags_of(flag_table(), cp)); });
  m.def("gpt2_spans", [](py::handle text) {
    const std::string_view s = utf8_of(text);
    std::vector<uint32_t> pos;
    std::vector<Span> spans;
    gpt2_split(s.data(), s.size(), pos, spans);
    return spans_to_list(spans);
  });
  m.def("bert_normalize", [](py::handle text, bool clean_text, bool handle_chinese_chars, bool strip_accents,
                             bool lowercase) {
    const std::string_view s = utf8_of(text);
    std::vector<uint32_t> cps;
    std::vector<int32_t> orig;
    normalize(s.data(), s.size(), options(clean_text, handle_chinese_chars, strip_accents, lowercase), cps, orig);
    return py::make_tuple(py::str(utf8_from_cps(cps)), orig);
  }, py::arg("text"), NORMALIZER_ARGS);
  m.def("bert_spans", [](py::handle text) {
    const std::string_view s = utf8_of(text);
    std::vector<uint32_t> cps;
    for (size_t i = 0; i < s.size();) cps.push_back(decode_utf8(s.data(), i));
    std::vector<Span> spans;
    bert_split(cps, spans);
    return spans_to_list(spans);
  });

  py::class_<Encoder>(m, "Encoder");

  py::class_<ByteLevelBPE, Encoder> byte_bpe(m, "ByteLevelBPE");
  byte_bpe.def(py::init([](const std::vector<std::pair<py::bytes, int32_t>>& vocab, const MergeList& merges,
                           size_t cache_words) {
    Vocab v;
    for (const auto& [tok, id] : vocab) v.emplace_back(std::string(tok), id);
    return std::make_unique<ByteLevelBPE>(v, merges, cache_words);
  }), py::arg("vocab"), py::arg("merges"), py::arg("cache_words") = 1 << 18);
  bind_encoder_methods(byte_bpe);

  py::class_<WordPieceEncoder, Encoder> wordpiece(m, "WordPiece");
  wordpiece.def(py::init([](const Vocab& vocab, int32_t unk_id, const std::string& prefix, size_t max_chars,
                            bool clean_text, bool handle_chinese_chars, bool strip_accents, bool lowercase,
                            size_t cache_words) {
    return std::make_unique<WordPieceEncoder>(options(clean_text, handle_chinese_chars, strip_accents, lowercase),
                                          std::make_unique<WordPieceModel>(vocab, unk_id, prefix, max_chars),
                                          cache_words);
  }), py::arg("vocab"), py::arg("unk_id"), py::arg("prefix") = "##", py::arg("max_chars") = 100, NORMALIZER_ARGS,
      py::arg("cache_words") = 1 << 18);
  bind_encoder_methods(wordpiece);

  py::class_<CharBPEEncoder, Encoder> char_bpe(m, "CharBPE");
  char_bpe.def(py::init([](const Vocab& vocab, const MergeList& merges, int32_t unk_id, const std::string& suffix,
                           bool clean_text, bool handle_chinese_chars, bool strip_accents, bool lowercase,
                           size_t cache_words) {
    return std::make_unique<CharBPEEncoder>(options(clean_text, handle_chinese_chars, strip_accents, lowercase),
                                          std::make_unique<CharBPEModel>(vocab, merges, unk_id, suffix), cache_words);
  }), py::arg("vocab"), py::arg("merges"), py::arg("unk_id"), py::arg("suffix") = "</w>", NORMALIZER_ARGS,
      py::arg("cache_words") = 1 << 18);
  bind_encoder_methods(char_bpe);

  py::class_<WordCounter>(m, "WordCounter")
      .def(py::init([](bool byte_level, bool clean_text, bool handle_chinese_chars, bool strip_accents,
                       bool lowercase) {
        return std::make_unique<WordCounter>(byte_level,
                                             options(clean_text, handle_chinese_chars, strip_accents, lowercase));
      }), py::arg("byte_level"), NORMALIZER_ARGS)
      .def("add", [](WordCounter& self, const py::sequence& texts, int num_threads) {
        std::vector<std::string_view> views;
        for (py::handle t : texts) views.push_back(utf8_of(t));
        py::gil_scoped_release nogil;
        self.add(views, num_threads);
      }, py::arg("texts"), py::arg("num_threads") = 1)
      .def("__len__", [](const WordCounter& self) { return self.counts().size(); })
      .def("items", [](const WordCounter& self) {
        py::list out;
        self.counts().for_each([&](const char* k, size_t n, int64_t c) {
          out.append(py::make_tuple(py::bytes(k, n), c));
        });
        return out;
      });

  m.def("train_bpe", [](std::vector<std::vector<int32_t>> words, const std::vector<int64_t>& counts,
                        const std::vector<py::bytes>& vocab, size_t vocab_size, int64_t min_frequency,
                        const py::bytes& strip_prefix, const std::function<void(size_t)>& progress) {
    std::vector<std::string> v(vocab.begin(), vocab.end());
    TrainOutput out = train_bpe(std::move(words), counts, std::move(v), vocab_size, min_frequency,
                                std::string(strip_prefix), progress);
    std::vector<py::bytes> tokens(out.vocab.begin(), out.vocab.end());
    return py::make_tuple(tokens, out.merges);
  }, py::arg("words"), py::arg("counts"), py::arg("vocab"), py::arg("vocab_size"), py::arg("min_frequency"),
     py::arg("strip_prefix") = py::bytes(""), py::arg("progress") = nullptr);
}
