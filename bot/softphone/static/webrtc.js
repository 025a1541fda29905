// Meta numbers' WebRTC leg. This placeholder says it is not available; the Meta path replaces
// this file with one defining the same window.callbotWebRTC.start(options).
window.callbotWebRTC = {
  available: false,
  async start({ onEnded }) {
    onEnded && onEnded("meta_not_available");
    throw new Error("meta_not_available");
  },
};
