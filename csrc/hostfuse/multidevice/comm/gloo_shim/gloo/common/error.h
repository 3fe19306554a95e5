// Stand-in for Gloo's error header: see multidevice/comm/gloo_shim/README.md.
// ProcessGroupGloo.hpp needs nothing from it.
#pragma once
