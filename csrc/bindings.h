// The CPU extension's Python module is one module assembled from several translation units:
// bindings.cpp defines it and calls each part's registration below, so the plan and the test
// hooks keep their own files and the module keeps one set of names.
#ifndef SHARDGROK_BINDINGS_H
#define SHARDGROK_BINDINGS_H

#include <pybind11/pybind11.h>

namespace sg {

void bind_plan(pybind11::module_& m);        // plan.cpp: the Plan class
void bind_test_hooks(pybind11::module_& m);  // test_hooks.cpp: header_*, cuda_order_sum, ...

}  // namespace sg

#endif  // SHARDGROK_BINDINGS_H
