// Drives the official JavaScript Speech SDK against an endpoint; prints one JSON line.
// node speech.js recognize|synthesize|translate|voices ENDPOINT TOKEN [WAV]
// node speech.js hold ENDPOINT TOKEN SECONDS: push SECONDS of audio and keep the turn open
//   (until a line on standard input: then the audio ends, and so does the turn)
// SPEECH_FORM=endpoint (fromEndpoint, the default) or host (fromHost): how the app configures the
// SDK. Run node with --experimental-websocket for Node's built-in WebSocket instead of `ws`.
"use strict";
const fs = require("fs");
const sdk = require("microsoft-cognitiveservices-speech-sdk");

const [mode, endpoint, token, wav] = process.argv.slice(2);
const form = process.env.SPEECH_FORM || "endpoint";
const Config = mode === "translate" ? sdk.SpeechTranslationConfig : sdk.SpeechConfig;
const config = form === "host" ? Config.fromHost(new URL(endpoint)) : Config.fromEndpoint(new URL(endpoint));
config.authorizationToken = token;
if (mode === "translate") {
  config.speechRecognitionLanguage = "en-US";
  config.addTargetLanguage("de");
}

function done(out) {
  console.log(JSON.stringify(out));
  process.exit(0);
}

function canceled(result) {
  const details = sdk.CancellationDetails.fromResult(result);
  return { reason: "Canceled", code: sdk.CancellationErrorCode[details.ErrorCode], details: details.errorDetails };
}

if (mode === "hold") {
  const push = sdk.AudioInputStream.createPushStream(sdk.AudioStreamFormat.getWaveFormatPCM(16000, 16, 1));
  const recognizer = new sdk.SpeechRecognizer(config, sdk.AudioConfig.fromStreamInput(push));
  recognizer.recognizeOnceAsync(
    (result) => done(result.reason === sdk.ResultReason.Canceled ? canceled(result)
      : { reason: sdk.ResultReason[result.reason], text: result.text }),
    (error) => done({ reason: "Error", details: String(error) }),
  );
  const samples = new Int16Array(Math.round(16000 * Number(wav))).fill(1);
  push.write(samples.buffer);
  console.log("streaming");  // the test acts now; the turn stays open until the relay ends it
  process.stdin.once("data", () => push.close());  setTimeout(() => done({ reason: "Timeout" }), 20000);
} else if (mode === "translate") {
  const audio = sdk.AudioConfig.fromWavFileInput(fs.readFileSync(wav));
  const recognizer = new sdk.TranslationRecognizer(config, audio);
  recognizer.recognizeOnceAsync(
    (result) => done(result.reason === sdk.ResultReason.Canceled ? canceled(result)
      : { reason: sdk.ResultReason[result.reason], text: result.text, de: result.translations.get("de") }),
    (error) => done({ reason: "Error", details: String(error) }),
  );
} else if (mode === "voices") {
  const synthesizer = new sdk.SpeechSynthesizer(config, null);
  synthesizer.getVoicesAsync().then(
    (result) => done({ reason: sdk.ResultReason[result.reason], details: result.errorDetails,
      voices: (result.voices || []).map((v) => v.shortName) }),
    (error) => done({ reason: "Error", details: String(error) }),
  );
} else if (mode === "recognize") {
  const audio = sdk.AudioConfig.fromWavFileInput(fs.readFileSync(wav));
  const recognizer = new sdk.SpeechRecognizer(config, audio);
  recognizer.recognizeOnceAsync(
    (result) => done(result.reason === sdk.ResultReason.Canceled ? canceled(result)
      : { reason: sdk.ResultReason[result.reason], text: result.text }),
    (error) => done({ reason: "Error", details: String(error) }),
  );
} else {
  const stream = sdk.AudioOutputStream.createPullStream();
  const synthesizer = new sdk.SpeechSynthesizer(config, sdk.AudioConfig.fromStreamOutput(stream));
  synthesizer.speakTextAsync(
    "hello",
    (result) => done(result.reason === sdk.ResultReason.Canceled ? canceled(result)
      : { reason: sdk.ResultReason[result.reason], bytes: result.audioData.byteLength }),
    (error) => done({ reason: "Error", details: String(error) }),
  );
}
