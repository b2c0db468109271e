// Compares the datasets of two HDF5 files byte for byte (tests only).
#pragma once

#include <set>
#include <string>

#include "csaq/storage/error.h"
#include "csaq/storage/h5.h"
#include "support.h"

namespace csaq::test {

// Every dataset under `group` of `a` equals its twin in `b` (types, shapes, bytes), except the
// names in `skip`; counts the datasets compared.
inline void expect_same_datasets(const storage::H5File& a, const storage::H5File& b, const std::string& group,
                                 int& compared, const std::set<std::string>& skip = {}) {
  const auto names = a.list(group);
  ASSERT_EQ(names, b.list(group)) << group;
  for (const auto& n : names) {
    const std::string path = group.empty() ? n : group + "/" + n;
    if (skip.count(path)) continue;
    at::Tensor ta, tb;
    try {
      ta = a.read(path);
      tb = b.read(path);
    } catch (const Error&) {  // a group: descend
      expect_same_datasets(a, b, path, compared, skip);
      continue;
    }
    EXPECT_EQ(ta.scalar_type(), tb.scalar_type()) << path;
    EXPECT_TRUE(ta.sizes() == tb.sizes() && at::equal(ta.view(at::kByte), tb.view(at::kByte))) << path;
    ++compared;
  }
}

}  // namespace csaq::test
