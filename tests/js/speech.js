// Drives the official JavaScript Speech SDK against an endpoint; prints one JSON line.
// node speech.js recognize|synthesize ENDPOINT TOKEN [WAV]
"use strict";
const fs = require("fs");
const sdk = require("microsoft-cognitiveservices-speech-sdk");

const [mode, endpoint, token, wav] = process.argv.slice(2);
const config = sdk.SpeechConfig.fromEndpoint(new URL(endpoint));
config.authorizationToken = token;

function done(out) {
  console.log(JSON.stringify(out));
  process.exit(0);
}

function canceled(result) {
  const details = sdk.CancellationDetails.fromResult(result);
  return { reason: "Canceled", code: sdk.CancellationErrorCode[details.ErrorCode], details: details.errorDetails };
}

if (mode === "recognize") {
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
