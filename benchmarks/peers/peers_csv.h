// The CSV of benchmarks/peers/bench_peers.py (its COLUMNS), appended to by
// the CUDA-only programs that add rows to the same comparison:
// bench_nvlink_push --peers-csv (the NVLink floor) and nccl_ep_bench (NCCL
// EP). Header-only C++17, no torch.
#pragma once

#include <cstdint>
#include <cstdio>
#include <ctime>
#include <string>
#include <vector>

namespace hostfuse::peers {

struct CsvRow {
  std::string device;
  int64_t ranks = 0, tokens = 0, hidden = 0, topk = 0, experts = 0;
  std::string row, phase;
  double median_us = 0;
  double bytes = 0;   // bench_peers.py's: every pick's row
  std::string check;  // "ok", "mismatch", or "-" where nothing is checked
};

// `field` as one CSV field: quoted where it holds a comma, a quote or a
// line break.
inline std::string csvField(const std::string& field) {
  if (field.find_first_of(",\"\n\r") == std::string::npos) {
    return field;
  }
  std::string quoted = "\"";
  for (const char c : field) {
    quoted += c == '"' ? std::string("\"\"") : std::string(1, c);
  }
  return quoted + "\"";
}

// Today's date as YYYY-MM-DD (local time), the CSVs' first column.
inline std::string today() {
  char date[16];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof(date), "%Y-%m-%d", std::localtime(&now));
  return date;
}

// `path` opened for appending, `header` (a line with its newline) written
// first when the file is new or empty and `write_header` holds; nullptr if
// it cannot be opened.
inline std::FILE* openCsvForAppend(const std::string& path, const char* header,
                                   bool write_header) {
  std::FILE* csv = std::fopen(path.c_str(), "a");
  if (csv == nullptr) {
    return nullptr;
  }
  std::fseek(csv, 0, SEEK_END);
  if (write_header && std::ftell(csv) == 0) {
    std::fputs(header, csv);
  }
  return csv;
}

// Appends `rows` to `path`, the header first when the file is new or
// empty; false if it cannot be opened for appending (rows = {} checks
// that alone).
inline bool appendCsv(const std::string& path,
                      const std::vector<CsvRow>& rows) {
  std::FILE* csv = openCsvForAppend(
      path,
      "date,device,ranks,tokens,hidden,topk,experts,row,phase,median_us,"
      "bytes,gbps,check\n",
      !rows.empty());
  if (csv == nullptr) {
    return false;
  }
  const std::string date = today();
  for (const CsvRow& r : rows) {
    std::fprintf(
        csv, "%s,%s,%lld,%lld,%lld,%lld,%lld,%s,%s,%.2f,%.0f,%.3f,%s\n",
        date.c_str(), csvField(r.device).c_str(),
        static_cast<long long>(r.ranks), static_cast<long long>(r.tokens),
        static_cast<long long>(r.hidden), static_cast<long long>(r.topk),
        static_cast<long long>(r.experts), csvField(r.row).c_str(),
        csvField(r.phase).c_str(), r.median_us, r.bytes,
        r.bytes / r.median_us / 1e3, csvField(r.check).c_str());
  }
  return std::fclose(csv) == 0;
}

}  // namespace hostfuse::peers
