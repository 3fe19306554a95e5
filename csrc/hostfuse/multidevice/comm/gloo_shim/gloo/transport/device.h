// Stand-in for Gloo's transport header: see
// multidevice/comm/gloo_shim/README.md.
#pragma once

namespace gloo::transport {

// Incomplete on purpose: held only through smart pointers that libtorch
// creates and destroys.
class Device;
class UnboundBuffer;

}  // namespace gloo::transport
