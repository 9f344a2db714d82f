// Load a detkit AOTInductor package and print the detections of one image.
//
//   detect MODEL.pt2 IMAGE.ppm [SCORE_THRESH]
//
// MODEL.pt2: written by `tools/export.py --format aoti` on a machine with this CPU architecture.
// IMAGE.ppm: a binary PPM (P6, RGB, 8 bits), e.g. `convert photo.jpg photo.ppm` or, in Python,
// PIL.Image.open("photo.jpg").convert("RGB").save("photo.ppm"). The image is resized to the
// model's test size with torch's bilinear interpolation (detkit resizes with OpenCV's, which
// rounds differently: boxes agree with tools/infer.py to a fraction of a pixel, not bit for bit).
//
// The package takes image (3, h, w) uint8 in the model's channel order and original_size (2,)
// int64 (h0, w0), and returns boxes (D, 4) xyxy float32 in original pixels, scores (D,) float32,
// labels (D,) int64, best first; its metadata holds the class names, the resize rule and the config.
#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <regex>
#include <string>
#include <vector>

// torch.h first: the loader's header relies on declarations it brings in.
#include <torch/torch.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

namespace {

// (3, h, w) uint8 RGB from a binary PPM.
torch::Tensor read_ppm(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  std::string magic;
  int width = 0, height = 0, max_value = 0;
  file >> magic >> width >> height >> max_value;
  if (!file || magic != "P6" || max_value != 255) {
    throw std::runtime_error(path + ": not a binary 8-bit PPM (P6); convert it with `convert IMAGE out.ppm`");
  }
  file.get();  // the single whitespace after the header
  auto hwc = torch::empty({height, width, 3}, torch::kUInt8);
  file.read(reinterpret_cast<char*>(hwc.data_ptr<uint8_t>()), hwc.numel());
  if (!file) throw std::runtime_error(path + ": truncated pixel data");
  return hwc.permute({2, 0, 1}).contiguous();
}

// The integer after "key": in a flat JSON object (the package's "resize" metadata).
int json_int(const std::string& json, const std::string& key) {
  std::smatch match;
  if (!std::regex_search(json, match, std::regex("\"" + key + "\":\\s*(-?[0-9]+)"))) {
    throw std::runtime_error("metadata has no " + key);
  }
  return std::stoi(match[1]);
}

// The strings of a JSON array of plain strings (the "class_names" metadata).
std::vector<std::string> json_strings(const std::string& json) {
  std::vector<std::string> out;
  std::regex item("\"([^\"]*)\"");
  for (auto it = std::sregex_iterator(json.begin(), json.end(), item); it != std::sregex_iterator(); ++it) {
    out.push_back((*it)[1]);
  }
  return out;
}

// Detectron2's ResizeShortestEdge output size (detkit.data.transforms.resized_hw).
std::pair<int64_t, int64_t> resized_hw(int64_t h, int64_t w, int short_size, int max_size) {
  double scale = double(short_size) / std::min(h, w);
  double nh = h < w ? short_size : scale * h, nw = h < w ? scale * w : short_size;
  if (max_size > 0 && std::max(nh, nw) > max_size) {
    double cap = max_size * 1.0 / std::max(nh, nw);
    nh *= cap;
    nw *= cap;
  }
  return {int64_t(nh + 0.5), int64_t(nw + 0.5)};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt2 IMAGE.ppm [SCORE_THRESH]\n";
    return 2;
  }
  // Register torchvision's nms / roi_align before the package needs them. The pip wheel's
  // torchvision library links libtorch_python, whose Python symbols libpython provides (loaded, never
  // initialised); a torchvision built against libtorch needs no PYTHON_LIB.
  for (const char* library : {DETKIT_PYTHON_LIB, DETKIT_TORCHVISION_LIB}) {
    if (std::string(library).size() && !dlopen(library, RTLD_NOW | RTLD_GLOBAL)) {
      std::cerr << "cannot load " << library << ": " << dlerror() << "\n";
      return 2;
    }
  }
  const float score_thresh = argc > 3 ? std::stof(argv[3]) : 0.5f;
  try {
    torch::NoGradGuard no_grad;
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    auto metadata = loader.get_metadata();
    const auto class_names = json_strings(metadata.at("class_names"));
    const auto& resize = metadata.at("resize");

    torch::Tensor image = read_ppm(argv[2]);  // (3, h0, w0) uint8 RGB
    const int64_t h0 = image.size(1), w0 = image.size(2);
    if (metadata.at("input_format") == "BGR") image = image.flip(0);
    auto [h, w] = resized_hw(h0, w0, json_int(resize, "min_size_test"), json_int(resize, "max_size_test"));
    auto resized = torch::nn::functional::interpolate(
                       image.unsqueeze(0).to(torch::kFloat),
                       torch::nn::functional::InterpolateFuncOptions()
                           .size(std::vector<int64_t>{h, w})
                           .mode(torch::kBilinear)
                           .align_corners(false))
                       .round()
                       .clamp(0, 255)
                       .to(torch::kUInt8)
                       .squeeze(0)
                       .contiguous();  // (3, h, w)
    auto original_size = torch::tensor({h0, w0}, torch::kInt64);

    auto outputs = loader.run({resized, original_size});
    auto boxes = outputs[0], scores = outputs[1], labels = outputs[2];  // (D, 4), (D,), (D,)
    std::printf("%s: %lld x %lld, resized to %lld x %lld, %lld detections at score >= %s\n", argv[2],
                (long long)h0, (long long)w0, (long long)h, (long long)w, (long long)scores.size(0),
                metadata.at("score_thresh").c_str());
    for (int64_t i = 0; i < scores.size(0); ++i) {
      const float score = scores[i].item<float>();
      if (score < score_thresh) break;  // best first
      const int64_t label = labels[i].item<int64_t>();
      auto box = boxes[i];
      std::printf("%-12s %.3f  [%.1f, %.1f, %.1f, %.1f]\n",
                  label < int64_t(class_names.size()) ? class_names[label].c_str() : "?", score,
                  box[0].item<float>(), box[1].item<float>(), box[2].item<float>(), box[3].item<float>());
    }
  } catch (const std::exception& error) {
    std::cerr << "error: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
